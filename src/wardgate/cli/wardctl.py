"""`wardctl`: cluster administration (users, roles, tokens, resources, locks, audit)."""

from __future__ import annotations

import os
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import click

from wardgate import __version__, runtime
from wardgate.api.client import AuthClient
from wardgate.api.codec import dump_json, dump_yaml, load_resources, resource_to_dict
from wardgate.api.identityfile import IdentityFile
from wardgate.api.resources import resolve_kind
from wardgate.cli.output import FORMATS, console, dump, fail, guarded, table
from wardgate.durations import parse_duration
from wardgate.errors import BadParameterError

T = TypeVar("T")


class Ctx:
    def __init__(
        self, identity: str | None, auth_server: str | None, data_dir: str | None, config: str | None
    ):
        self.identity, self.auth_server, self.data_dir, self.config = identity, auth_server, data_dir, config

    def identity_path(self) -> Path:
        if self.identity:
            return Path(self.identity)
        if env := os.environ.get("WARDCTL_IDENTITY"):
            return Path(env)
        data_dir = self.data_dir
        if not data_dir and self.config:
            from wardgate.config import load_config

            data_dir = load_config(self.config).wardgate.data_dir
        path = Path(data_dir or "./wardgate-data") / "admin.identity"
        if not path.exists():
            raise BadParameterError(
                f"no identity at {path}: run wardctl on the auth host with --data-dir (or -c), "
                "or pass -i IDENTITY_FILE"
            )
        return path

    def run(self, fn: Callable[[AuthClient], Awaitable[T]]) -> T:
        ident = IdentityFile.load(self.identity_path())

        async def go() -> T:
            async with AuthClient.from_identity(ident, self.auth_server or "") as client:
                return await fn(client)

        return runtime.run(go())


pass_ctx = click.make_pass_decorator(Ctx)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "-i", "--identity", envvar="WARDCTL_IDENTITY", help="Identity file (default: <data_dir>/admin.identity)."
)
@click.option(
    "--auth-server",
    envvar="WARDCTL_AUTH_SERVER",
    help="Auth API address HOST:PORT (default: from the identity).",
)
@click.option("--data-dir", help="The auth host's data dir, to find the admin identity.")
@click.option("-c", "--config", help="The auth host's wardgate.yaml, to find the data dir.")
@click.version_option(__version__, prog_name="wardctl")
@click.pass_context
def main(
    ctx: click.Context,
    identity: str | None,
    auth_server: str | None,
    data_dir: str | None,
    config: str | None,
) -> None:
    """Administer a Wardgate cluster."""
    ctx.obj = Ctx(identity, auth_server, data_dir, config)


def _fmt_time(value: Any) -> str:
    if not value:
        return "never"
    dt = value if isinstance(value, datetime) else datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    return dt.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _parse_kv_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _parse_traits(items: tuple[str, ...]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise BadParameterError(f"--traits {item!r}: use NAME=VALUE[,VALUE]")
        out.setdefault(k, []).extend(_parse_kv_list(v))
    return out


def _ttl(text: str, flag: str = "--ttl") -> timedelta:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise BadParameterError(f"{flag}: {exc}") from None


# ---------------------------------------------------------------- users


@main.group()
def users() -> None:
    """Create, list, reset and remove local users."""


def _print_invite(data: dict[str, Any], name: str) -> None:
    console.print(
        f"User [bold]{name}[/] has been invited. The invitation expires {_fmt_time(data['invite_expires'])}."
    )
    if data.get("invite_url"):
        console.print(f"Share this link: {data['invite_url']}")
    console.print(
        "Or register in a terminal:\n"
        f"  ward register --proxy=<auth or proxy address> --invite={data['invite_token']}"
    )


@users.command("add")
@click.argument("name")
@click.option("--roles", required=True, help="Comma-separated roles, e.g. access,editor.")
@click.option("--logins", default="", help="Comma-separated OS logins (trait `logins`).")
@click.option("--traits", multiple=True, help="Extra traits NAME=V1,V2 (repeatable).")
@click.option("--format", "fmt", type=FORMATS, default="text")
@pass_ctx
@guarded
def users_add(c: Ctx, name: str, roles: str, logins: str, traits: tuple[str, ...], fmt: str) -> None:
    """Create a user and print an invitation to set a password and second factor."""
    tr = _parse_traits(traits)
    if logins:
        tr["logins"] = _parse_kv_list(logins)
    data = c.run(lambda cl: cl.create_user(name, _parse_kv_list(roles), tr))
    if fmt != "text":
        dump(data, fmt)
        return
    _print_invite(data, name)


@users.command("ls")
@click.option("--format", "fmt", type=FORMATS, default="text")
@pass_ctx
@guarded
def users_ls(c: Ctx, fmt: str) -> None:
    """List users."""
    items = c.run(lambda cl: cl.list_resources("user"))
    if fmt != "text":
        dump([resource_to_dict(u) for u in items], fmt)
        return
    now = datetime.now(UTC)
    rows = []
    for u in items:
        s = u.spec
        locked = s.status.locked_until and s.status.locked_until > now
        state = (
            f"locked until {_fmt_time(s.status.locked_until)}"
            if locked
            else ("active" if s.has_password else "invited")
        )
        rows.append(
            [
                u.name,
                ",".join(s.roles),
                ",".join(s.traits.get("logins", [])),
                ",".join(s.mfa_devices) or "-",
                state,
            ]
        )
    table(
        ["User", "Roles", "Logins", "MFA", "Status"],
        rows,
        empty="No users yet: wardctl users add NAME --roles=access",
    )


@users.command("rm")
@click.argument("name")
@pass_ctx
@guarded
def users_rm(c: Ctx, name: str) -> None:
    """Remove a user (their certificates stay valid until they expire: lock them to cut access now)."""
    c.run(lambda cl: cl.delete_resource("user", name))
    console.print(f"User {name} has been deleted.")


@users.command("reset")
@click.argument("name")
@pass_ctx
@guarded
def users_reset(c: Ctx, name: str) -> None:
    """Forget a user's password and MFA devices and issue a new invitation."""
    data = c.run(lambda cl: cl.reset_user(name))
    _print_invite(data, name)


@users.command("unlock")
@click.argument("name")
@pass_ctx
@guarded
def users_unlock(c: Ctx, name: str) -> None:
    """Lift a lockout caused by failed logins."""
    c.run(lambda cl: cl.unlock_user(name))
    console.print(f"User {name} has been unlocked.")


@users.command("update")
@click.argument("name")
@click.option("--set-roles", help="Replace the roles (comma-separated).")
@click.option("--set-logins", help="Replace the logins trait (comma-separated).")
@click.option("--set-traits", multiple=True, help="Replace a trait NAME=V1,V2 (repeatable).")
@pass_ctx
@guarded
def users_update(
    c: Ctx, name: str, set_roles: str | None, set_logins: str | None, set_traits: tuple[str, ...]
) -> None:
    """Change a user's roles or traits (takes effect at their next login)."""
    if not (set_roles or set_logins is not None or set_traits):
        raise BadParameterError("nothing to change: pass --set-roles, --set-logins or --set-traits")

    async def go(cl: AuthClient) -> None:
        user = await cl.get_resource("user", name)
        if set_roles:
            user.spec.roles = _parse_kv_list(set_roles)
        if set_logins is not None:
            user.spec.traits["logins"] = _parse_kv_list(set_logins)
        user.spec.traits.update(_parse_traits(set_traits))
        await cl.put_resource(user, force=True)

    c.run(go)
    console.print(f"User {name} has been updated.")


# ---------------------------------------------------------------- tokens


@main.group()
def tokens() -> None:
    """Join tokens for services (nodes, apps, databases…)."""


@tokens.command("add")
@click.option(
    "--type", "types", required=True, help="System roles the token grants: node,app,db,kube,desktop,proxy."
)
@click.option("--ttl", default="30m", show_default=True, help="How long the token stays valid.")
@click.option("--format", "fmt", type=FORMATS, default="text")
@pass_ctx
@guarded
def tokens_add(c: Ctx, types: str, ttl: str, fmt: str) -> None:
    """Create a join token (shown once; only its hash is stored)."""
    _ttl(ttl)
    data = c.run(lambda cl: cl.create_token(_parse_kv_list(types), ttl))
    if fmt != "text":
        dump(data, fmt)
        return
    console.print(f"The invite token: [bold]{data['token']}[/]")
    console.print(
        f"This token will expire at {_fmt_time(data['expires'])} and grants: {','.join(data['roles'])}."
    )
    console.print("Use it in the joining service's wardgate.yaml as `wardgate.auth_token`.")


@tokens.command("ls")
@click.option("--format", "fmt", type=FORMATS, default="text")
@pass_ctx
@guarded
def tokens_ls(c: Ctx, fmt: str) -> None:
    """List join tokens (by id; secrets are never shown again)."""
    items = c.run(lambda cl: cl.list_resources("token"))
    if fmt != "text":
        dump([resource_to_dict(t) for t in items], fmt)
        return
    table(
        ["ID", "Type", "Expires"],
        [[t.name, ",".join(t.spec.roles), _fmt_time(t.metadata.expires)] for t in items],
        empty="No tokens.",
    )


@tokens.command("rm")
@click.argument("token_id")
@pass_ctx
@guarded
def tokens_rm(c: Ctx, token_id: str) -> None:
    """Delete a token by its ID (first 16 hex digits of its hash, as `tokens ls` shows)."""
    c.run(lambda cl: cl.delete_resource("token", token_id))
    console.print(f"Token {token_id} has been deleted.")


# ---------------------------------------------------------------- resources


def _split_ref(ref: str) -> tuple[str, str]:
    kind, _, name = ref.partition("/")
    try:
        return resolve_kind(kind), name
    except ValueError as exc:
        raise BadParameterError(str(exc)) from None


@main.command("get")
@click.argument("ref")
@click.option("--format", "fmt", type=FORMATS, default="yaml", show_default=True)
@pass_ctx
@guarded
def get_cmd(c: Ctx, ref: str, fmt: str) -> None:
    """Print resources: KIND (all) or KIND/NAME, as YAML (default), JSON or a table."""
    kind, name = _split_ref(ref)
    items = (
        c.run(lambda cl: cl.get_resource(kind, name)) if name else c.run(lambda cl: cl.list_resources(kind))
    )
    items = items if isinstance(items, list) else [items]
    if fmt == "yaml":
        click.echo(dump_yaml(items).rstrip() if items else "")
    elif fmt == "json":
        click.echo(dump_json(items if not name else items[0]))
    else:
        table(
            ["Kind", "Name", "Labels", "Expires"],
            [
                [
                    r.kind,
                    r.name,
                    ",".join(f"{k}={v}" for k, v in r.metadata.labels.items()),
                    _fmt_time(r.metadata.expires),
                ]
                for r in items
            ],
            empty=f"No {kind} resources.",
        )


@main.command("create")
@click.option("-f", "--file", "path", required=True, help="YAML or JSON file; - reads standard input.")
@click.option("--force", is_flag=True, help="Overwrite resources that exist.")
@pass_ctx
@guarded
def create_cmd(c: Ctx, path: str, force: bool) -> None:
    """Create resources from a file (several YAML documents are fine)."""
    if path == "-":
        text, source = sys.stdin.read(), "<stdin>"
    else:
        try:
            text, source = Path(path).read_text(), path
        except OSError as exc:
            raise BadParameterError(f"cannot read {path}: {exc.strerror}") from None
    resources = load_resources(text, source)
    if not resources:
        raise BadParameterError(f"{source}: no resources found")

    async def go(cl: AuthClient) -> None:
        for r in resources:
            await cl.put_resource(r, force=force)
            console.print(f'{r.kind} "{r.name}" has been {"created or updated" if force else "created"}.')

    c.run(go)


@main.command("rm")
@click.argument("ref")
@pass_ctx
@guarded
def rm_cmd(c: Ctx, ref: str) -> None:
    """Delete a resource: KIND/NAME."""
    kind, name = _split_ref(ref)
    if not name:
        raise BadParameterError("name the resource: KIND/NAME, e.g. role/dev")
    c.run(lambda cl: cl.delete_resource(kind, name))
    console.print(f'{kind} "{name}" has been deleted.')


# ---------------------------------------------------------------- nodes


@main.group()
def nodes() -> None:
    """SSH nodes: list them, or register agentless OpenSSH servers."""


@nodes.command("ls")
@click.option("--format", "fmt", type=FORMATS, default="text")
@pass_ctx
@guarded
def nodes_ls(c: Ctx, fmt: str) -> None:
    """Registered nodes (agents renew theirs with heartbeats; agentless ones stay until removed)."""
    items = c.run(lambda cl: cl.list_resources("node"))
    if fmt != "text":
        dump([resource_to_dict(n) for n in items], fmt)
        return
    rows = [
        [
            n.name,
            n.spec.addr or "(tunnel)",
            "agentless" if n.spec.agentless else ("tunnel" if n.spec.tunnel else "direct"),
            ",".join(f"{k}={v}" for k, v in sorted(n.all_labels().items())),
            n.spec.host_id,
        ]
        for n in items
    ]
    table(["Node", "Address", "Mode", "Labels", "Host ID"], rows, empty="No nodes registered.")


@nodes.command("add")
@click.option(
    "--agentless", is_flag=True, required=True, help="A plain OpenSSH server (no Wardgate agent on it)."
)
@click.option(
    "--name", required=True, help="Node name; its host certificate needs NAME.<cluster> (auth sign --host)."
)
@click.option("--addr", required=True, help="HOST:PORT the proxy dials (the sshd).")
@click.option("--labels", default="", help="Comma-separated key=value labels for RBAC.")
@pass_ctx
@guarded
def nodes_add(c: Ctx, agentless: bool, name: str, addr: str, labels: str) -> None:
    """Register an agentless OpenSSH node.

    \b
    On that server: trust the user CA and present a host certificate:
      wardctl auth export --type=user > /etc/ssh/wardgate_user_ca.pub
      wardctl auth sign --host=NAME -o /etc/ssh/wardgate_host_key
    and in sshd_config: TrustedUserCAKeys, HostKey, HostCertificate (printed by auth sign).
    """
    from wardgate.api.resources import Node, NodeSpec
    from wardgate.config import parse_addr

    try:
        host, port = parse_addr(addr, 22)
    except ValueError as exc:
        raise BadParameterError(f"--addr: {exc}") from None
    label_map: dict[str, str] = {}
    for part in _parse_kv_list(labels):
        k, eq, v = part.partition("=")
        if not eq or not k:
            raise BadParameterError(f"--labels {part!r}: use key=value")
        label_map[k] = v
    node = Node.new(
        name,
        NodeSpec(hostname=name, addr=f"{host}:{port}", host_id=name, agentless=agentless),
        labels=label_map,
    )
    c.run(lambda cl: cl.put_resource(node))
    console.print(f"Node {name} ({host}:{port}) has been registered as an agentless OpenSSH node.")


# ---------------------------------------------------------------- locks


@main.command("lock")
@click.option("--user", default="", help="Everything this user does.")
@click.option("--role", default="", help="Everyone holding this role.")
@click.option("--node", default="", help="Sessions to this node (host id or name).")
@click.option("--login", default="", help="SSH sessions as this OS login.")
@click.option("--app", default="", help="Access to this app (open sessions end within seconds).")
@click.option("--ttl", default="", help="How long the lock holds (default: until removed).")
@click.option("--message", default="", help="Shown to whoever is refused.")
@pass_ctx
@guarded
def lock_cmd(c: Ctx, user: str, role: str, node: str, login: str, app: str, ttl: str, message: str) -> None:
    """Deny new access at once to a user, role, node, login or app; open sessions of the
    user or role (and of the app) are cut too."""
    named = {"user": user, "role": role, "node": node, "login": login, "app": app}
    target = {k: v for k, v in named.items() if v}
    if not target:
        raise BadParameterError("name what to lock: --user, --role, --node, --login or --app")
    if ttl:
        _ttl(ttl)
    lock = c.run(lambda cl: cl.create_lock(target, ttl, message))
    what = ", ".join(f"{k}={v}" for k, v in target.items())
    console.print(
        f"Created lock {lock.name} on {what}, in force until "
        f"{_fmt_time(lock.metadata.expires) if ttl else 'removed'}."
    )
    console.print(f"Remove it with: wardctl rm lock/{lock.name}")


# ---------------------------------------------------------------- status, auth


@main.command("status")
@click.option("--format", "fmt", type=FORMATS, default="text")
@pass_ctx
@guarded
def status_cmd(c: Ctx, fmt: str) -> None:
    """Cluster name and CA fingerprints (and the pin clients use to trust the cluster)."""
    st = c.run(lambda cl: cl.status())
    if fmt != "text":
        dump(st, fmt)
        return
    console.print(f"Cluster  {st['cluster_name']}")
    console.print(f"CA pin   {st['ca_pin']}")
    table(
        ["CA", "SSH fingerprint", "TLS pin"],
        [[ca["type"], ca.get("ssh_fingerprint", "-"), ca.get("tls_pin", "-")] for ca in st["cas"]],
    )


@main.group("auth")
def auth_group() -> None:
    """Export CAs and sign identities."""


@auth_group.command("export")
@click.option(
    "--type", "ca_type", type=click.Choice(["user", "host", "db", "tls-user", "tls-host"]), required=True
)
@pass_ctx
@guarded
def auth_export(c: Ctx, ca_type: str) -> None:
    """Print a CA's public part in the form its consumer wants.

    \b
    user      a line for sshd's TrustedUserCAKeys file
    host      an @cert-authority line for known_hosts
    db, tls-* the X.509 CA certificate (PEM)
    """
    base = ca_type.removeprefix("tls-")
    data = c.run(lambda cl: cl.export_ca(base))
    if ca_type == "user":
        for k in data["ssh_public_keys"]:
            click.echo(f"{k.split(' ')[0]} {k.split(' ')[1]} wardgate-user-ca@{data['cluster_name']}")
    elif ca_type == "host":
        for k in data["ssh_public_keys"]:
            click.echo(
                "@cert-authority * "
                + " ".join(k.split(" ")[:2])
                + f" wardgate-host-ca@{data['cluster_name']}"
            )
    else:
        for pem in data["tls_cert_pems"]:
            click.echo(pem.rstrip())


@auth_group.command("sign")
@click.option("--user", help="Sign an identity file for this (bot) user.")
@click.option(
    "--host",
    help="An OpenSSH server's name; with --format=db the database's names and addresses (comma-separated).",
)
@click.option("--principals", default="", help="With --host: extra names/addresses (comma-separated).")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["identity", "openssh", "db"]),
    default=None,
    help="identity (default with --user), openssh (default with --host), or db: a server "
    "certificate for PostgreSQL/MariaDB from the db CA.",
)
@click.option(
    "-o", "--out", required=True, help="Output file (--user) or prefix of the files written (--host)."
)
@click.option(
    "--ttl", default="", help="Validity (default: 12h for users, 30 days for hosts, 8760h for databases)."
)
@pass_ctx
@guarded
def auth_sign(
    c: Ctx, user: str | None, host: str | None, principals: str, fmt: str | None, out: str, ttl: str
) -> None:
    """Issue credentials: an identity file for a bot, host keys+cert for OpenSSH, or a
    database's server certificate.

    \b
    wardctl auth sign --user=ci -o ci.identity
    wardctl auth sign --host=web1 -o /etc/ssh/wardgate_host_key
    wardctl auth sign --format=db --host=db.internal,10.0.0.5 --out=/etc/postgresql/wardgate
    """
    from wardgate.keys import (
        generate_ssh_key,
        generate_tls_key,
        private_key_pem,
        public_key_pem,
        ssh_private_key_openssh,
        ssh_public_key_line,
    )

    if bool(user) == bool(host):
        raise BadParameterError("pass exactly one of --user or --host")
    fmt = fmt or ("identity" if user else "openssh")
    if (fmt == "identity") != bool(user):
        raise BadParameterError(
            "--format=identity goes with --user; --format=openssh and --format=db go with --host"
        )
    if ttl:
        _ttl(ttl)
    if fmt == "db":
        assert host is not None
        if principals:
            raise BadParameterError("--format=db takes every name and address in --host (comma-separated)")
        _sign_db_server(c, _parse_kv_list(host), out, ttl or "8760h")
        return
    if user:
        key = generate_tls_key()
        data = c.run(
            lambda cl: cl.sign_user(user=user, tls_public_key=public_key_pem(key.public_key()), ttl=ttl)
        )
        IdentityFile(
            key_pem=private_key_pem(key),
            cert_pem=data["tls_cert"],
            ca_pems=data["host_ca_pems"],
            auth_server=c.auth_server or IdentityFile.load(c.identity_path()).auth_server,
            cluster=data["cluster_name"],
        ).save(out)
        console.print(f"Wrote identity file for {user} to {out}, valid until {_fmt_time(data['expires'])}.")
        return
    assert host is not None
    key = generate_ssh_key()
    extra = _parse_kv_list(principals)
    data = c.run(
        lambda cl: cl.sign_host(
            host_id=host,
            node_name=host,
            ssh_public_key=ssh_public_key_line(key.public_key()),
            addresses=extra,
            ttl=ttl or "720h",
        )
    )
    base = Path(out)
    fd = os.open(base, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(ssh_private_key_openssh(key))
    Path(f"{out}.pub").write_text(ssh_public_key_line(key.public_key()) + "\n")
    Path(f"{out}-cert.pub").write_text(data["ssh_cert"].strip() + "\n")
    console.print(f"Wrote {out}, {out}.pub and {out}-cert.pub. In sshd_config:")
    console.print(f"  HostKey {base.resolve()}\n  HostCertificate {base.resolve()}-cert.pub")
    console.print(
        "  TrustedUserCAKeys /etc/ssh/wardgate_user_ca.pub   # from: wardctl auth export --type=user"
    )


def _write_private(path: Path, text: str) -> None:
    """0600 from the first byte, also when the file existed with wider permissions."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(text)


def _sign_db_server(c: Ctx, hosts: list[str], out: str, ttl: str) -> None:
    """`--format=db`: PREFIX.key, PREFIX.crt (db CA-signed, SANs = hosts) and PREFIX.cas (the db
    CA, which the database trusts for the client certificates Wardgate presents)."""
    from wardgate.keys import generate_tls_key, load_x509, private_key_pem, public_key_pem

    if not hosts:
        raise BadParameterError("--host: give the names and addresses the database answers to")
    key = generate_tls_key()
    data = c.run(lambda cl: cl.db_server_cert(hosts, public_key_pem(key.public_key()), ttl))
    cert_pem, ca_pem = str(data["tls_cert"]).strip() + "\n", str(data["ca_pem"]).strip() + "\n"
    until = _fmt_time(load_x509(cert_pem).not_valid_after_utc)
    key_path, crt_path, cas_path = (Path(f"{out}.{ext}") for ext in ("key", "crt", "cas"))
    _write_private(key_path, private_key_pem(key))
    crt_path.write_text(cert_pem)
    cas_path.write_text(ca_pem)
    k, crt, cas = (p.resolve() for p in (key_path, crt_path, cas_path))
    console.print(
        f"Wrote {key_path}, {crt_path} and {cas_path} (the database CA), for {', '.join(hosts)}, "
        f"valid until {until}.\n"
        "The key must be readable by the database's OS user only "
        f"(e.g. chown postgres:postgres {k}; chmod 600 {k}).\n"
        "\nPostgreSQL, postgresql.conf:\n"
        f"  ssl = on\n  ssl_cert_file = '{crt}'\n  ssl_key_file = '{k}'\n  ssl_ca_file = '{cas}'\n"
        "and pg_hba.conf (Wardgate logs in with a certificate whose common name is the db user):\n"
        "  hostssl all all 0.0.0.0/0 cert\n  hostssl all all ::/0 cert\n"
        "\nMariaDB/MySQL, my.cnf under [mysqld]:\n"
        f"  ssl-cert = {crt}\n  ssl-key = {k}\n  ssl-ca = {cas}\n"
        "and for each user Wardgate connects as (its certificate's subject is /CN=<db user>):\n"
        "  ALTER USER 'alice'@'%' REQUIRE SUBJECT '/CN=alice';\n"
        "  -- REQUIRE X509 also works, but accepts a db-CA certificate issued for any user",
        markup=False,
    )


# ---------------------------------------------------------------- access explain


@main.group("access")
def access_group() -> None:
    """Ask why access is allowed or denied."""


@access_group.command("explain")
@click.option("--user", required=True)
@click.argument("target")
@click.option("--login", required=True, help="The OS login to check.")
@click.option("--format", "fmt", type=FORMATS, default="text")
@pass_ctx
@guarded
def access_explain(c: Ctx, user: str, target: str, login: str, fmt: str) -> None:
    """Explain whether USER may reach TARGET (node/NAME) as LOGIN, and which role decides."""
    kind, name = _split_ref(target)
    if kind != "node" or not name:
        raise BadParameterError(
            "target must be node/NAME (apps, databases and clusters come with their issues)"
        )
    data = c.run(lambda cl: cl.explain(user, name, login))
    if fmt != "text":
        dump(data, fmt)
        return
    verdict = "[bold green]ALLOWED[/]" if data["allowed"] else "[bold red]DENIED[/]"
    console.print(f"{verdict}: {user} as {login} on node/{name}")
    console.print(f"  {data['reason']}")
    if data["trace"]:
        console.print("Roles examined:")
        for line in data["trace"]:
            console.print(f"  - {line}", markup=False)
    if not data["allowed"]:
        sys.exit(2)


# ---------------------------------------------------------------- recordings


@main.group("recordings")
def recordings_group() -> None:
    """Session recordings."""


@recordings_group.command("ls")
@click.option("--format", "fmt", type=FORMATS, default="text")
@pass_ctx
@guarded
def recordings_ls(c: Ctx, fmt: str) -> None:
    """Recorded sessions, newest first (replay with `ward play ID`)."""
    items = c.run(lambda cl: cl.list_recordings())
    if fmt != "text":
        dump(items, fmt)
        return
    rows = [
        [
            r["sid"],
            r.get("user", ""),
            r.get("login", ""),
            r.get("server_hostname") or r.get("server_id", ""),
            (r.get("session_start") or r.get("time") or "")[:19].replace("T", " "),
            _duration(r),
        ]
        for r in items
    ]
    table(
        ["Session ID", "User", "Login", "Node", "Started (UTC)", "Duration"], rows, empty="No recordings yet."
    )


def _duration(r: dict[str, Any]) -> str:
    secs = int(float(r.get("duration") or 0))
    return f"{secs // 60}m{secs % 60:02d}s"


# ---------------------------------------------------------------- audit


@main.group("audit")
def audit_group() -> None:
    """Search the audit log."""


@audit_group.command("search")
@click.option(
    "--since", default="1h", show_default=True, help="Look back this far (duration) or from an RFC 3339 time."
)
@click.option("--until", default="", help="End (RFC 3339 time); default now.")
@click.option(
    "--type", "types", multiple=True, help="Event type, e.g. user.login (repeatable; `session.*` prefixes)."
)
@click.option("--user", default="")
@click.option("--sid", default="", help="Session id.")
@click.option("--limit", default=50, show_default=True)
@click.option("--format", "fmt", type=FORMATS, default="text")
@pass_ctx
@guarded
def audit_search(
    c: Ctx, since: str, until: str, types: tuple[str, ...], user: str, sid: str, limit: int, fmt: str
) -> None:
    """Newest events first."""
    since_dt = _time_or_ago(since, "--since")
    until_dt = _time_or_ago(until, "--until") if until else None
    events, _ = c.run(
        lambda cl: cl.search_events(
            since=since_dt, until=until_dt, types=types, user=user, sid=sid, limit=limit
        )
    )
    if fmt != "text":
        dump(events, fmt)
        return
    skip = {"event", "code", "time", "uid", "user", "success"}
    rows = [
        [
            e["time"][:19].replace("T", " "),
            e["event"],
            e["code"],
            e.get("user", ""),
            "ok" if e.get("success", True) else "FAILED",
            " ".join(f"{k}={v}" for k, v in e.items() if k not in skip),
        ]
        for e in events
    ]
    table(["Time (UTC)", "Event", "Code", "User", "Result", "Details"], rows, empty="No events match.")


def _time_or_ago(text: str, flag: str) -> datetime:
    try:
        return datetime.now(UTC) - parse_duration(text)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise BadParameterError(
            f"{flag}: give a duration like 2h or a time like 2026-11-24T10:00:00Z"
        ) from None
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


if __name__ == "__main__":
    try:
        main()
    except BadParameterError as e:  # pragma: no cover
        fail(str(e))
