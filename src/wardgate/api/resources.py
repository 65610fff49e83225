"""Resource kinds as pydantic models: `kind`, `version`, `metadata`, `spec`.

Every kind people edit as YAML lives here, so the auth API, `wardctl` and the services agree on
one shape. Secrets (password hashes, CA private keys, MFA seeds) are never part of a resource
that is shown: they live in their own models with `secret` in the name and are stripped by
`without_secrets()` before anything leaves the auth service.
"""

from __future__ import annotations

import ipaddress
import re
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, ClassVar, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from wardgate.durations import Duration

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,252}$")
LABEL_KEY_RE = re.compile(r"^[A-Za-z0-9/._:*-]{1,63}$")

SYSTEM_ROLES = ("auth", "proxy", "node", "app", "db", "kube", "desktop", "admin")
SystemRole = Literal["auth", "proxy", "node", "app", "db", "kube", "desktop", "admin"]
"""Roles of machines, not people. `admin` is the local administrator identity of `wardctl`."""


class Model(BaseModel):
    """Strict base: unknown fields are an error that names them (typos must not pass silently)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)


def utcnow() -> datetime:
    return datetime.now(UTC)


class Metadata(Model):
    name: str
    description: str = ""
    labels: dict[str, str] = Field(default_factory=dict)
    expires: datetime | None = None
    revision: int | None = None
    """Set by the backend on read; pass it back to update only what you read (optimistic lock)."""

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError("must start with a letter or digit and hold only letters, digits and . _ @ + -")
        return v

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        for k in v:
            if not LABEL_KEY_RE.match(k):
                raise ValueError(f"label key {k!r} must be 1-63 characters of letters, digits and /._:-")
        return v

    @field_validator("expires")
    @classmethod
    def _aware(cls, v: datetime | None) -> datetime | None:
        if v is not None and v.tzinfo is None:
            v = v.replace(tzinfo=UTC)
        return v


class Resource(Model):
    """Base of every kind. Subclasses fix `kind` and give `spec` a type."""

    KIND: ClassVar[str] = ""
    kind: str
    version: Literal["v1"] = "v1"
    metadata: Metadata
    spec: Any = None

    @field_validator("kind")
    @classmethod
    def _kind(cls, v: str) -> str:
        if cls.KIND and v != cls.KIND:
            raise ValueError(f"expected kind {cls.KIND!r}, got {v!r}")
        return v

    @property
    def name(self) -> str:
        return self.metadata.name

    def is_expired(self, now: datetime | None = None) -> bool:
        exp = self.metadata.expires
        return exp is not None and exp <= (now or utcnow())

    def without_secrets(self) -> Resource:
        return self

    @classmethod
    def new(cls, name: str, spec: Any = None, **meta: Any) -> Any:
        """Build a resource of this kind: `Role.new("dev", RoleSpec(...), labels={...})`."""
        spec_type = cls.model_fields["spec"].annotation
        if spec is None and isinstance(spec_type, type) and issubclass(spec_type, BaseModel):
            spec = spec_type()
        return cls(kind=cls.KIND, metadata=Metadata(name=name, **meta), spec=spec)


# ---------------------------------------------------------------- roles

LabelValues = str | list[str]
LabelMap = dict[str, LabelValues]
"""Keys AND, values OR; values are exact strings, `*` globs, or `^…$` regexes; traits expand."""


class Rule(Model):
    resources: list[str]
    verbs: list[str]
    where: str | None = None

    @field_validator("verbs")
    @classmethod
    def _verbs(cls, v: list[str]) -> list[str]:
        allowed = {"*", "list", "read", "create", "update", "delete"}
        bad = [x for x in v if x not in allowed]
        if bad:
            raise ValueError(f"unknown verb(s) {bad}: use {sorted(allowed)}")
        return v


class RoleConditions(Model):
    logins: list[str] = Field(default_factory=list)
    node_labels: LabelMap = Field(default_factory=dict)
    app_labels: LabelMap = Field(default_factory=dict)
    db_labels: LabelMap = Field(default_factory=dict)
    db_users: list[str] = Field(default_factory=list)
    db_names: list[str] = Field(default_factory=list)
    kubernetes_labels: LabelMap = Field(default_factory=dict)
    kubernetes_groups: list[str] = Field(default_factory=list)
    kubernetes_users: list[str] = Field(default_factory=list)
    desktop_labels: LabelMap = Field(default_factory=dict)
    desktop_logins: list[str] = Field(default_factory=list)
    rules: list[Rule] = Field(default_factory=list)
    join_sessions: list[str] = Field(default_factory=list)
    """Kinds of session participation allowed: `observer`, `peer` (used by `ward join`)."""


class RoleOptions(Model):
    """Unset options take the defaults below; across roles the strictest value wins."""

    max_session_ttl: Duration = timedelta(hours=12)
    require_session_mfa: bool = False
    port_forwarding: bool = True
    forward_agent: bool = False
    client_idle_timeout: Duration | None = None
    disconnect_expired_cert: bool = False
    record_session: bool = True
    record_input: bool = False


class RoleSpec(Model):
    options: RoleOptions = Field(default_factory=RoleOptions)
    allow: RoleConditions = Field(default_factory=RoleConditions)
    deny: RoleConditions = Field(default_factory=RoleConditions)


class Role(Resource):
    KIND: ClassVar[str] = "role"
    kind: str = "role"
    spec: RoleSpec = Field(default_factory=RoleSpec)


# ---------------------------------------------------------------- users

Traits = dict[str, list[str]]


class UserStatus(Model):
    locked_until: datetime | None = None
    lock_reason: str = ""


class UserSpec(Model):
    roles: list[str] = Field(default_factory=list)
    traits: Traits = Field(default_factory=dict)
    """`logins`, `db_users`, `kubernetes_groups`… feed `{{internal.NAME}}` in roles."""
    status: UserStatus = Field(default_factory=UserStatus)
    created: datetime | None = None
    created_by: str = ""
    has_password: bool = False
    mfa_devices: list[str] = Field(default_factory=list)
    """Names of enrolled MFA devices (their secrets live elsewhere)."""


class User(Resource):
    KIND: ClassVar[str] = "user"
    kind: str = "user"
    spec: UserSpec = Field(default_factory=UserSpec)


# ---------------------------------------------------------------- tokens


class TokenSpec(Model):
    roles: list[SystemRole]
    token_hash: str = ""
    """sha256 hex of the token; the token itself is shown once and never stored."""
    static: bool = False

    @field_validator("roles")
    @classmethod
    def _non_empty(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("a token needs at least one system role (node, app, db, kube, desktop, proxy)")
        return v


class Token(Resource):
    KIND: ClassVar[str] = "token"
    kind: str = "token"
    spec: TokenSpec

    def without_secrets(self) -> Token:
        return self.model_copy(update={"spec": self.spec.model_copy(update={"token_hash": ""})})


# ---------------------------------------------------------------- certificate authorities

CAType = Literal["user", "host", "db", "jwt"]


class CAKeyPair(Model):
    ssh_public_key: str = ""
    """OpenSSH one-line public key (user and host CAs)."""
    ssh_private_key_pem: str = ""
    tls_cert_pem: str = ""
    """Self-signed X.509 CA certificate (user, host and db CAs)."""
    tls_private_key_pem: str = ""
    jwt_public_key_pem: str = ""
    jwt_private_key_pem: str = ""


class CertAuthoritySpec(Model):
    type: CAType
    cluster_name: str
    active_keys: list[CAKeyPair] = Field(default_factory=list)
    additional_trusted_keys: list[CAKeyPair] = Field(default_factory=list)
    """Keys still trusted (e.g. during rotation) but no longer used to sign."""


class CertAuthority(Resource):
    KIND: ClassVar[str] = "cert_authority"
    kind: str = "cert_authority"
    spec: CertAuthoritySpec

    def without_secrets(self) -> CertAuthority:
        def strip(kp: CAKeyPair) -> CAKeyPair:
            return kp.model_copy(
                update={"ssh_private_key_pem": "", "tls_private_key_pem": "", "jwt_private_key_pem": ""}
            )

        spec = self.spec.model_copy(
            update={
                "active_keys": [strip(k) for k in self.spec.active_keys],
                "additional_trusted_keys": [strip(k) for k in self.spec.additional_trusted_keys],
            }
        )
        return self.model_copy(update={"spec": spec})


# ---------------------------------------------------------------- nodes


class CommandLabel(Model):
    name: str
    command: list[str]
    period: Duration = timedelta(minutes=1)
    result: str = ""


class NodeSpec(Model):
    hostname: str = ""
    addr: str = ""
    """host:port the proxy dials in direct mode; empty when reachable only through a tunnel."""
    host_id: str = ""
    tunnel: bool = False
    agentless: bool = False
    cmd_labels: dict[str, CommandLabel] = Field(default_factory=dict)
    version: str = ""


class Node(Resource):
    KIND: ClassVar[str] = "node"
    kind: str = "node"
    spec: NodeSpec = Field(default_factory=NodeSpec)

    def all_labels(self) -> dict[str, str]:
        """Static labels plus the latest output of command labels."""
        out = dict(self.metadata.labels)
        out.update({k: v.result for k, v in self.spec.cmd_labels.items()})
        return out


# ---------------------------------------------------------------- databases


class DatabaseTLS(Model):
    mode: Literal["verify-full", "verify-ca", "insecure", "off"] = "verify-full"
    """How the database service checks the database's certificate (`off`: no TLS at all)."""
    ca_cert_file: str = ""
    """CA bundle for the database's server certificate; empty means the cluster's db CA."""
    server_name: str = ""
    """Name to verify in the server certificate; empty means the host of `uri`."""


class DatabasePassword(Model):
    """Where the password for one database user comes from (managed databases that cannot
    trust a CA); never the password itself."""

    file: str = ""
    env: str = ""

    @model_validator(mode="after")
    def _one(self) -> DatabasePassword:
        if bool(self.file) == bool(self.env):
            raise ValueError("give exactly one of file or env")
        return self


class DatabaseAuth(Model):
    passwords: dict[str, DatabasePassword] = Field(default_factory=dict)
    """db user -> password source; users not listed log in with a certificate from the db CA."""


class DatabaseSpec(Model):
    protocol: Literal["postgres", "mysql"]
    uri: str
    """host:port of the database as the database service reaches it."""
    tls: DatabaseTLS = Field(default_factory=DatabaseTLS)
    auth: DatabaseAuth = Field(default_factory=DatabaseAuth)
    host_id: str = ""
    """The database service that registered it (static config); empty for `wardctl create`d ones,
    which any database service whose `resources` selectors match its labels serves."""
    hostname: str = ""

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        v = v.strip().removeprefix("postgres://").removeprefix("mysql://").rstrip("/")
        host, sep, port = v.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("uri must be host:port, like db.internal:5432")
        return v


class Database(Resource):
    KIND: ClassVar[str] = "db"
    kind: str = "db"
    spec: DatabaseSpec


class DatabaseServiceSpec(Model):
    hostname: str = ""
    tunnel: bool = False
    resources: list[dict[str, str]] = Field(default_factory=list)
    """Label selectors of the dynamic `db` resources this service serves."""
    databases: list[str] = Field(default_factory=list)
    """Names of the databases it serves right now."""


class DatabaseService(Resource):
    """Heartbeat of one database service (name = its host id), so proxies know where to go."""

    KIND: ClassVar[str] = "db_service"
    kind: str = "db_service"
    spec: DatabaseServiceSpec = Field(default_factory=DatabaseServiceSpec)


# ---------------------------------------------------------------- applications

APP_URI_SCHEMES = ("http", "https", "tcp")
DNS_LABEL_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
UPSTREAM_HOST_RE = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_.-]{0,252})$")
"""Looser than DNS: upstream names like `my_service` (Docker, /etc/hosts) are common."""
HEADER_NAME_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
JWT_HEADER = "Wardgate-Jwt-Assertion"
HOP_BY_HOP_HEADERS = frozenset(
    ("connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection", "te",
     "trailer", "transfer-encoding", "upgrade")
)  # fmt: skip
"""RFC 9110 7.6.1: they describe one connection, not the request, so they are not forwarded."""
RESERVED_HEADERS = frozenset(
    ("wardgate-jwt-assertion", "content-length", "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto",
     "x-forwarded-port")
)  # fmt: skip
"""Set by the app service itself: letting a config override them would forge the user's identity
(the JWT), what the client asked for (X-Forwarded-*), or break HTTP framing."""
DEFAULT_PROXY_PORT = 3080


def _port(text: str, what: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"{what}: port {text!r} must be a number from 1 to 65535")
    return int(text)


def _dns_name(host: str) -> bool:
    labels = host.rstrip(".").split(".")
    return len(host) <= 253 and all(DNS_LABEL_RE.match(label) for label in labels)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def split_host_port(addr: str, default_port: int = 0, *, what: str = "") -> tuple[str, int]:
    """`host`, `host:port`, `[v6]:port` -> (host, port or `default_port`)."""
    addr = addr.strip()
    what = what or repr(addr)
    if addr.startswith("["):
        host, _, rest = addr[1:].partition("]")
        port = rest.removeprefix(":")
        return host, (_port(port, what) if port else default_port)
    if addr.count(":") == 1:
        host, _, port = addr.partition(":")
        return host, (_port(port, what) if port else default_port)
    return addr, default_port


class AppHeader(Model):
    """One request header the app service adds for the app; `{{internal.*}}`/`{{external.*}}`
    in the value expand from the user's traits."""

    name: str
    value: str

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not HEADER_NAME_RE.match(v):
            raise ValueError(f"header name {v!r} may hold only letters, digits and !#$%&'*+-.^_`|~")
        if v.lower() in HOP_BY_HOP_HEADERS:
            raise ValueError(f"header {v!r} is hop-by-hop (about one connection): it cannot be added")
        if v.lower() in RESERVED_HEADERS:
            raise ValueError(f"header {v!r} is set by Wardgate itself and cannot be rewritten")
        return v

    @field_validator("value")
    @classmethod
    def _value(cls, v: str) -> str:
        if any(c in v for c in "\r\n\0"):
            raise ValueError("a header value cannot hold line breaks or NUL characters")
        return v


class AppRewrite(Model):
    redirect: list[str] = Field(default_factory=list)
    """More host names whose redirects (`Location`) the app service points at the public address."""
    headers: list[AppHeader] = Field(default_factory=list)

    @field_validator("redirect")
    @classmethod
    def _redirect(cls, v: list[str]) -> list[str]:
        for host in v:
            if not host or "/" in host or any(c.isspace() for c in host):
                raise ValueError(f"redirect host {host!r} must be a bare host name, like localhost")
        return v


class AppSpec(Model):
    uri: str
    """Where the app service reaches the app: `http://`, `https://` or `tcp://host:port`."""
    public_addr: str = ""
    """Host name (optionally `:port`) users reach it at; empty means `<name>.<proxy host>`."""
    insecure_skip_verify: bool = False
    """For `https` upstreams whose certificate cannot be verified (self-signed)."""
    rewrite: AppRewrite = Field(default_factory=AppRewrite)
    host_id: str = ""
    """The app service that registered it (static config); empty for `wardctl create`d ones,
    which any app service whose `resources` selectors match its labels serves."""
    hostname: str = ""

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        v = v.strip()
        scheme, sep, _ = v.partition("://")
        if not sep or scheme.lower() not in APP_URI_SCHEMES:
            raise ValueError(
                f"uri {v!r} must start with http://, https:// or tcp://, like http://127.0.0.1:3000"
            )
        try:
            parts = urlsplit(v)
            port = parts.port
        except ValueError:
            raise ValueError(f"uri {v!r}: port must be a number from 1 to 65535") from None
        host = parts.hostname or ""
        if not host:
            raise ValueError(f"uri {v!r} names no host, like http://127.0.0.1:3000")
        if not UPSTREAM_HOST_RE.match(host) and not _is_ip(host):
            raise ValueError(f"uri {v!r}: {host!r} is neither a host name nor an IP address")
        if parts.username is not None or parts.password is not None:
            raise ValueError(f"uri {v!r}: put no user name or password in the uri")
        if port == 0:
            raise ValueError(f"uri {v!r}: port must be a number from 1 to 65535")
        if scheme.lower() == "tcp":
            if port is None:
                raise ValueError(f"uri {v!r}: a tcp app needs a port, like tcp://10.0.0.5:5432")
            if parts.path not in ("", "/") or parts.query or parts.fragment:
                raise ValueError(f"uri {v!r}: a tcp app is host:port only, no path")
        return v

    @field_validator("public_addr")
    @classmethod
    def _public_addr(cls, v: str) -> str:
        v = v.strip()
        if not v:
            return v
        if "://" in v or "/" in v:
            raise ValueError(f"public_addr {v!r} is a host name (and optional :port), without scheme or path")
        host, port = split_host_port(v, what=f"public_addr {v!r}")
        host = host.rstrip(".").lower()
        if not host or _is_ip(host) or not _dns_name(host):
            raise ValueError(
                f"public_addr {v!r} must be a DNS name like grafana.proxy.example "
                "(browsers pick the app by host name, so not an IP address)"
            )
        return f"{host}:{port}" if port else host


class App(Resource):
    """An HTTP or TCP application the app service publishes on the proxy's port."""

    KIND: ClassVar[str] = "app"
    kind: str = "app"
    spec: AppSpec

    @model_validator(mode="after")
    def _dns_name_when_default_addr(self) -> App:
        if not self.spec.public_addr and not DNS_LABEL_RE.match(self.metadata.name):
            raise ValueError(
                f"app name {self.metadata.name!r} must be a DNS label (letters, digits and -, at most 63) "
                "because its public address defaults to <name>.<proxy host>; or set spec.public_addr"
            )
        return self

    @property
    def uri_kind(self) -> Literal["http", "tcp"]:
        return "tcp" if self.spec.uri.lower().startswith("tcp://") else "http"


def app_public_addr(app: App, proxy_public_addr: str) -> str:
    """`host:port` users reach the app at: its `public_addr` (with the proxy's port unless it
    names one), else `<name>.<proxy host>`, or `<name>.localhost` when the proxy is published as
    an IP address (browsers resolve `*.localhost` to loopback, and no certificate covers `*.<ip>`)."""
    proxy_host, proxy_port = split_host_port(proxy_public_addr, DEFAULT_PROXY_PORT)
    if app.spec.public_addr:
        host, port = split_host_port(app.spec.public_addr, proxy_port)
        return f"{host}:{port}"
    proxy_host = proxy_host.rstrip(".").lower()
    base = "localhost" if not proxy_host or _is_ip(proxy_host) else proxy_host
    return f"{app.name.lower()}.{base}:{proxy_port}"


class AppServiceSpec(Model):
    hostname: str = ""
    tunnel: bool = False
    resources: list[dict[str, str]] = Field(default_factory=list)
    """Label selectors of the dynamic `app` resources this service serves."""
    apps: list[str] = Field(default_factory=list)
    """Names of the apps it serves right now."""


class AppService(Resource):
    """Heartbeat of one app service (name = its host id), so proxies know where an app is served."""

    KIND: ClassVar[str] = "app_service"
    kind: str = "app_service"
    spec: AppServiceSpec = Field(default_factory=AppServiceSpec)


# ---------------------------------------------------------------- locks


class LockTarget(Model):
    user: str = ""
    role: str = ""
    node: str = ""
    login: str = ""
    app: str = ""

    def is_empty(self) -> bool:
        return not (self.user or self.role or self.node or self.login or self.app)


class LockSpec(Model):
    target: LockTarget
    message: str = ""
    created_by: str = ""
    created: datetime | None = None

    @field_validator("target")
    @classmethod
    def _target(cls, v: LockTarget) -> LockTarget:
        if v.is_empty():
            raise ValueError("a lock needs a target: user, role, node, login or app")
        return v


class Lock(Resource):
    KIND: ClassVar[str] = "lock"
    kind: str = "lock"
    spec: LockSpec


# ---------------------------------------------------------------- registry

KINDS: dict[str, type[Resource]] = {
    cls.KIND: cls
    for cls in (Role, User, Token, CertAuthority, Node, Lock, Database, DatabaseService, App, AppService)
}
KIND_ALIASES = {
    "roles": "role",
    "users": "user",
    "tokens": "token",
    "cert_authorities": "cert_authority",
    "cas": "cert_authority",
    "ca": "cert_authority",
    "nodes": "node",
    "locks": "lock",
    "dbs": "db",
    "database": "db",
    "databases": "db",
    "db_services": "db_service",
    "apps": "app",
    "application": "app",
    "applications": "app",
    "app_services": "app_service",
}

AnyResource = Annotated[Resource, "any kind"]


def resolve_kind(name: str) -> str:
    """Accept `role`, `roles`, `cas`…; raise ValueError listing what exists."""
    k = KIND_ALIASES.get(name, name)
    if k not in KINDS:
        raise ValueError(f"unknown kind {name!r}: expected one of {', '.join(sorted(KINDS))}")
    return k


def register_kind(cls: type[Resource], *aliases: str) -> type[Resource]:
    """Later capabilities (app, db, kube_cluster…) add their kinds here."""
    KINDS[cls.KIND] = cls
    for a in aliases:
        KIND_ALIASES[a] = cls.KIND
    return cls
