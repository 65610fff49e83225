"""`ward`: the user's client."""

from __future__ import annotations

import contextlib
import getpass
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import click

from wardgate import __version__, runtime
from wardgate.cli.output import FORMATS, console, details, dump, err_console, guarded, table
from wardgate.errors import AccessDeniedError, AuthenticationError, BadParameterError, NotFoundError

if TYPE_CHECKING:
    from collections.abc import Callable

    from wardgate.client.db import DBLogin
    from wardgate.client.profile import Profile
    from wardgate.client.routed import LoginStore


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ward")
def main() -> None:
    """Reach servers, databases, apps and clusters through Wardgate."""


@main.command()
@click.option(
    "--proxy", required=True, help="Cluster address HOST:PORT (the auth service, or the proxy once it runs)."
)
@click.option("--invite", "token", required=True, help="The invitation token `wardctl users add` printed.")
@click.option(
    "--ca-pin", default="", help="Pin of the cluster CA from `wardctl status` (trust on first use)."
)
@click.option("--insecure", is_flag=True, help="Trust the cluster without a pin (development only).")
@guarded
def register(proxy: str, token: str, ca_pin: str, insecure: bool) -> None:
    """Accept an invitation: set a password and enrol an authenticator app."""
    from wardgate.api.client import AuthClient
    from wardgate.api.identityfile import server_trusting_context
    from wardgate.auth.totp import qr_text

    pems = runtime.run(AuthClient.discover_trust(proxy, ca_pin=ca_pin, insecure=insecure))

    async def begin() -> dict:
        async with AuthClient(proxy, server_trusting_context(pems)) as c:
            return await c.begin_registration(token)

    info = runtime.run(begin())
    console.print(f"Welcome, [bold]{info['user']}[/]. Choose a password (at least 12 characters).")
    while True:
        password = click.prompt("Password", hide_input=True, confirmation_prompt="Confirm password")
        if len(password) >= 12:
            break
        console.print("That password is too short: use at least 12 characters.")
    otp = ""
    if info.get("totp_uri"):
        console.print("\nScan this QR code with your authenticator app (or enter the secret by hand):")
        console.print(qr_text(info["totp_uri"], ansi=sys.stdout.isatty()), markup=False)
        console.print(f"Secret: {info['totp_secret']}\nURI: {info['totp_uri']}", markup=False)
        otp = click.prompt("Enter the 6-digit code the app shows", type=str).strip()

    async def complete() -> dict:
        async with AuthClient(proxy, server_trusting_context(pems)) as c:
            return await c.complete_registration(token, password, otp)

    try:
        done = runtime.run(complete())
    except (AuthenticationError, BadParameterError) as exc:
        raise type(exc)(f"registration failed: {exc}") from None
    console.print(
        f"\nUser {done['user']} is registered with roles {', '.join(done['roles'])}. You can now log in."
    )


# ---------------------------------------------------------------- login, status, logout


def _valid_text(p: Profile) -> str:
    until = f"{p.valid_until:%Y-%m-%d %H:%M:%S} UTC"
    if p.is_expired():
        return f"{until} [EXPIRED]"
    from wardgate.durations import format_duration

    left = p.valid_until - datetime.now(UTC)
    return f"{until} (valid for {format_duration(left)})"


def _print_profile(p: Profile) -> None:
    details(
        [
            ("Proxy", p.proxy),
            ("Cluster", p.cluster),
            ("User", p.user),
            ("Roles", ", ".join(p.roles)),
            ("Logins", ", ".join(p.logins)),
            ("Valid until", _valid_text(p)),
        ]
    )


def _load(proxy: str = "", *, valid: bool = True) -> Profile:
    from wardgate.client.profile import ProfileStore

    profile = ProfileStore().load(proxy or None)
    return profile.require_valid() if valid else profile


PROXY_OPTION = click.option(
    "--proxy", default="", help="Use the profile of this proxy (HOST:PORT) instead of the current one."
)
LOCAL_PORT_OPTION = click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=0,
    show_default=True,
    help="Local port (0: any free one).",
)


@main.command()
@click.option(
    "--proxy", required=True, envvar="WARD_PROXY", help="Proxy address HOST:PORT (default port 3080)."
)
@click.option(
    "--user",
    default=lambda: getpass.getuser(),
    show_default="your local user name",
    help="Wardgate user name.",
)
@click.option("--ttl", default="", help="Certificate lifetime, e.g. 8h (default 12h, capped by your roles).")
@click.option("--ca-pin", default="", help="Pin of the cluster CA from `wardctl status` (first login).")
@click.option("--insecure", is_flag=True, help="Trust the cluster without a pin (development only).")
@guarded
def login(proxy: str, user: str, ttl: str, ca_pin: str, insecure: bool) -> None:
    """Log in: prompts for the password (and one-time code) and saves certificates in ~/.ward."""
    from wardgate.client.login import discover, parse_ttl
    from wardgate.client.login import login as do_login

    lifetime = parse_ttl(ttl)
    info = runtime.run(discover(proxy, ca_pin=ca_pin, insecure=insecure))
    password = click.prompt(f"Password for {user}", hide_input=True, err=True)
    otp = ""
    if info.needs_otp:
        otp = click.prompt("One-time code from your authenticator app", err=True).strip()
    profile = runtime.run(
        do_login(proxy, user, password, otp, ttl=lifetime, ca_pin=ca_pin, insecure=insecure, info=info)
    )
    _print_profile(profile)


@main.command()
@click.option("--format", "fmt", type=FORMATS, default="text", show_default=True)
@guarded
def status(fmt: str) -> None:
    """Show who you are logged in as, where, and until when."""
    profile = _load(valid=False)
    if fmt != "text":
        dump({**profile.to_dict(), "expired": profile.is_expired()}, fmt)
        return
    _print_profile(profile)
    if profile.is_expired():
        console.print(
            f"\nRun `ward login --proxy={profile.proxy} --user={profile.user}` to renew.", markup=False
        )


@main.command()
@PROXY_OPTION
@guarded
def logout(proxy: str) -> None:
    """Delete the profile's keys and certificates from ~/.ward."""
    from wardgate.client.profile import ProfileStore

    removed = ProfileStore().remove(proxy or None)
    if removed is None:
        console.print("Not logged in.")
        return
    console.print(f"Logged out {removed.user} from {removed.proxy}.", markup=False)


# ---------------------------------------------------------------- nodes and SSH


@main.command(name="ls")
@click.argument("labels", nargs=-1)
@click.option("--format", "fmt", type=FORMATS, default="text", show_default=True)
@PROXY_OPTION
@guarded
def ls(labels: tuple[str, ...], fmt: str, proxy: str) -> None:
    """List the nodes you may reach, optionally only those with every label=value given."""
    from wardgate.client.nodes import Selector, filter_nodes, node_rows, visible_nodes

    selector = Selector.parse(labels)
    profile = _load(proxy)
    nodes = filter_nodes(runtime.run(visible_nodes(profile)), selector)
    if fmt != "text":
        dump(nodes, fmt)
        return
    table(
        ["Node", "Address", "Labels", "Logins"],
        node_rows(nodes),
        empty="No nodes match."
        if selector
        else "No nodes: none are registered, or your roles let you see none.",
    )


SSH_CONTEXT = {"allow_interspersed_args": False, "help_option_names": ["-h", "--help"]}


@main.command(context_settings=SSH_CONTEXT)
@click.option(
    "-p", "--port", type=click.IntRange(1, 65535), help="Node SSH port (default: its registered one)."
)
@click.option(
    "-l", "--login", "login_opt", default="", help="Remote login (default: your first allowed login)."
)
@click.option("-L", "local_forwards", multiple=True, metavar="SPEC", help="Local port forwarding, as ssh -L.")
@click.option(
    "-R", "remote_forwards", multiple=True, metavar="SPEC", help="Remote port forwarding, as ssh -R."
)
@click.option("-D", "dynamic_forwards", multiple=True, metavar="SPEC", help="SOCKS forwarding, as ssh -D.")
@click.option("-A", "forward_agent", is_flag=True, help="Forward your SSH agent.")
@click.option("-t", "tty", count=True, help="Force a terminal (twice: even without a local one).")
@click.option("-T", "no_tty", is_flag=True, help="Never allocate a terminal.")
@click.option("-N", "no_command", is_flag=True, help="Run no command (for port forwarding).")
@click.option("-o", "options", multiple=True, metavar="OPTION", help="Extra OpenSSH option, as ssh -o.")
@click.option("-v", "verbose", count=True, help="Verbose OpenSSH output.")
@PROXY_OPTION
@click.argument("target")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@guarded
def ssh(
    port: int | None,
    login_opt: str,
    local_forwards: tuple[str, ...],
    remote_forwards: tuple[str, ...],
    dynamic_forwards: tuple[str, ...],
    forward_agent: bool,
    tty: int,
    no_tty: bool,
    no_command: bool,
    options: tuple[str, ...],
    verbose: int,
    proxy: str,
    target: str,
    command: tuple[str, ...],
) -> None:
    """SSH to [LOGIN@]NODE with OpenSSH, or run COMMAND on all nodes matching label=value.

    TARGET is [LOGIN@]NODE, or [LOGIN@]label=value[,label=value] to run COMMAND on every
    matching node in parallel, each output line prefixed with [NODE]. The exit code is ssh's;
    across several nodes, the highest.
    """
    from wardgate.client.nodes import Selector, is_selector, visible_nodes
    from wardgate.client.ssh import argvs_for_nodes, exec_program, run_on_nodes, split_login, ssh_argv

    profile = _load(proxy)
    cmd = list(command[1:] if command[:1] == ("--",) else command)
    if is_selector(target):
        if local_forwards or remote_forwards or dynamic_forwards or tty:
            raise BadParameterError("port forwarding and -t need a single node, not a label selector")
        login_name, selector_text = split_login(target, login_opt, profile)
        selector = Selector.parse([selector_text])
        nodes = runtime.run(visible_nodes(profile))
        argvs = argvs_for_nodes(
            profile,
            nodes,
            selector,
            login_name,
            cmd,
            port=port,
            options=options,
            verbose=verbose,
            forward_agent=forward_agent,
        )
        sys.exit(runtime.run(run_on_nodes(argvs)))
    login_name, node = split_login(target, login_opt, profile)
    from wardgate.client.mfa import session_mfa_options

    mfa = runtime.run(session_mfa_options(profile, node, _ask_mfa_code))
    argv = ssh_argv(
        profile,
        node,
        login_name,
        cmd,
        port=port,
        local_forwards=local_forwards,
        remote_forwards=remote_forwards,
        dynamic_forwards=dynamic_forwards,
        forward_agent=forward_agent,
        tty=tty,
        no_tty=no_tty,
        no_command=no_command,
        verbose=verbose,
        options=(*options, *mfa),
    )
    exec_program(argv)


def _ask_mfa_code() -> str:
    if not sys.stdin.isatty():
        raise AccessDeniedError(
            "your roles require a second factor for each session and there is no terminal to ask "
            "for a one-time code in: run the command in a terminal"
        )
    return str(click.prompt("Your roles require MFA for each session. One-time code", err=True))


@main.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-r", "recursive", is_flag=True, help="Copy directories recursively.")
@click.option("-p", "preserve", is_flag=True, help="Preserve modification times and modes.")
@click.option("-q", "quiet", is_flag=True, help="No progress meter.")
@click.option("-P", "--port", type=click.IntRange(1, 65535), help="Node SSH port.")
@click.option(
    "-l", "--login", "login_opt", default="", help="Remote login (default: your first allowed login)."
)
@click.option("-o", "options", multiple=True, metavar="OPTION", help="Extra OpenSSH option.")
@PROXY_OPTION
@click.argument("paths", nargs=-1, required=True)
@guarded
def scp(
    recursive: bool,
    preserve: bool,
    quiet: bool,
    port: int | None,
    login_opt: str,
    options: tuple[str, ...],
    proxy: str,
    paths: tuple[str, ...],
) -> None:
    """Copy files with OpenSSH scp; a remote side is written [LOGIN@]NODE:PATH.

    PATHS are SOURCE... DEST, as for scp.
    """
    from wardgate.client.ssh import exec_program, scp_argv

    if len(paths) < 2:
        raise BadParameterError("scp needs a source and a destination")
    profile = _load(proxy)
    argv = scp_argv(
        profile,
        paths[:-1],
        paths[-1],
        login=login_opt,
        recursive=recursive,
        preserve=preserve,
        port=port,
        quiet=quiet,
        options=options,
    )
    exec_program(argv)


@main.command()
@PROXY_OPTION
@guarded
def config(proxy: str) -> None:
    """Print an OpenSSH config block: `ssh LOGIN@NODE.CLUSTER` then works with ssh, scp, rsync, Ansible."""
    from wardgate.client.sshconfig import ssh_config_block

    click.echo(ssh_config_block(_load(proxy, valid=False)), nl=False)


@main.group()
def proxy() -> None:
    """Local helpers that native clients run."""


@proxy.command(name="ssh")
@click.option("--proxy", "proxy_addr", default="", help="Proxy HOST:PORT of the profile to use.")
@click.option(
    "--home",
    default="",
    envvar="WARD_HOME",
    help="Ward home (default ~/.ward); set by `ward config` if moved.",
)
@click.argument("target")
@guarded
def proxy_ssh(proxy_addr: str, home: str, target: str) -> None:
    """Connect stdin/stdout to LOGIN@HOST:PORT through the proxy (OpenSSH's ProxyCommand)."""
    from wardgate.client.profile import ProfileStore
    from wardgate.client.sshproxy import parse_proxy_target, proxy_stdio

    profile = ProfileStore(home or None).load(proxy_addr or None).require_valid()
    t = parse_proxy_target(target, profile)
    runtime.run(proxy_stdio(profile, t.host, t.port, t.login))


def _warn(message: str) -> None:
    """One line on stderr for a problem with one connection (the listener keeps going)."""
    from rich.markup import escape

    err_console.print(f"[bold yellow]WARNING:[/] {escape(message)}", markup=True, highlight=False)


@proxy.command(name="db")
@click.argument("name")
@LOCAL_PORT_OPTION
@click.option(
    "--tunnel",
    is_flag=True,
    help="Add your identity here: local clients connect without TLS or certificates. "
    "Without it they must present your database certificate.",
)
@click.option("--db-user", default="", help="Log in as this database user first (if not already).")
@click.option("--db-name", default="", help="Log in to this database on the server first (if not already).")
@PROXY_OPTION
@guarded
def proxy_db(name: str, port: int, tunnel: bool, db_user: str, db_name: str, proxy: str) -> None:
    """Listen on 127.0.0.1 and relay each connection to database NAME through the proxy.

    Every local connection gets its own TLS connection to the proxy carrying your certificate
    for NAME (from `ward db login`). Runs until Ctrl-C; prints the client command to use.

    Without --tunnel, local clients must speak TLS to the listener and present that certificate
    themselves, so other local users cannot use it. The printed command names the files
    (`ward db config NAME` too; local.crt is the listener's own certificate):

    \b
      psql: sslmode=verify-ca sslrootcert=local.crt sslcert=NAME.crt sslkey=NAME.key
      mysql/mariadb: --ssl-ca=local.crt --ssl-cert=NAME.crt --ssl-key=NAME.key

    With --tunnel, psql, mysql or any GUI client connects to 127.0.0.1:PORT without TLS or a
    password: anyone who can reach the port acts as you.
    """
    from wardgate.client.db import (
        LOCAL_HOST,
        DBCertTunnel,
        DBStore,
        DBTunnel,
        check_db_name,
        connect_command,
        ensure_login,
    )
    from wardgate.client.localproxy import serve_tunnel

    check_db_name(name)
    profile = _load(proxy, valid=False)
    store = DBStore(profile)
    login = runtime.run(ensure_login(profile, name, db_user, db_name, store=store, ask_code=_ask_mfa_code))
    login.require_valid()
    flavor = ""
    if login.protocol == "mysql":
        from wardgate.client.db import find_client

        with contextlib.suppress(BadParameterError):
            flavor = find_client("mysql").flavor
    kind = "tunnel" if tunnel else "proxy"

    def ready(bound: int) -> None:
        who = login.db_user + (f", database {login.db_name}" if login.db_name else "")
        libpq_key = store.libpq_key_path(login) if login.protocol == "postgres" and not tunnel else None
        cmd = connect_command(login, bound, flavor=flavor, tunnel=tunnel, libpq_key=libpq_key)
        note = ""
        if not tunnel:
            note = (
                f"Clients must present {login.cert_path} (key {login.key_path}"
                + (f", for libpq clients {libpq_key}" if libpq_key and libpq_key != login.key_path else "")
                + f") and verify this listener by {login.local_ca_path}.\n"
            )
        click.echo(
            f'Started a local {kind} to database "{name}" ({login.protocol}, as {who}) on '
            f"{LOCAL_HOST}:{bound}. Connect with:\n\n  {cmd}\n\n{note}Press Ctrl-C to stop."
        )
        sys.stdout.flush()

    cls = DBTunnel if tunnel else DBCertTunnel
    t = cls(profile, name, store=store, on_error=_warn)
    runtime.run(serve_tunnel(t, port=port, on_ready=ready))
    err_console.print(f'Stopped the {kind} to database "{name}".', markup=False)


@proxy.command(name="app")
@click.argument("name")
@LOCAL_PORT_OPTION
@click.option(
    "--bind",
    default="127.0.0.1",
    show_default=True,
    help="Local address to listen on: whoever can reach it uses the app as you.",
)
@PROXY_OPTION
@guarded
def proxy_app(name: str, port: int, bind: str, proxy: str) -> None:
    """Listen locally and relay each connection to app NAME through the proxy.

    Every local connection gets its own TLS connection to the proxy carrying your certificate
    for NAME, so curl, a browser or a TCP app's own client (redis-cli, …) connects to the
    local port with plain HTTP or TCP and no certificate. The certificate is fetched, and
    renewed when it expires, as `ward app login` would. Runs until Ctrl-C.
    """
    import ipaddress

    from wardgate.client.app import AppTunnel, check_app_name, ensure_app_login, local_command
    from wardgate.client.localproxy import serve_tunnel

    check_app_name(name)
    profile = _load(proxy, valid=False)
    login = runtime.run(ensure_app_login(profile, name, ask_code=_ask_mfa_code))
    with contextlib.suppress(ValueError):
        if not ipaddress.ip_address(bind).is_loopback:
            _warn(f'listening on {bind}: anyone who can reach this port uses app "{name}" as you')

    def ready(bound: int) -> None:
        shown = f"[{bind}]" if ":" in bind else bind
        click.echo(
            f'Started a local proxy for app "{name}" ({login.kind}, {login.public_addr}) on '
            f"{shown}:{bound}. Use it with:\n\n  {local_command(login.kind, bind, bound)}\n\n"
            "Press Ctrl-C to stop."
        )
        sys.stdout.flush()

    t = AppTunnel(profile, name, ask_code=_ask_mfa_code, on_error=_warn)
    runtime.run(serve_tunnel(t, host=bind, port=port, on_ready=ready))
    err_console.print(f'Stopped the local proxy for app "{name}".', markup=False)


# ---------------------------------------------------------------- databases


@main.group()
def db() -> None:
    """Databases: list, log in, connect with psql or mysql, settings for other clients."""


def _db_users_text(entry: dict) -> str:
    return ", ".join(str(u) for u in entry.get("db_users") or [])


def _as_text(login_user: str, login_db: str) -> str:
    return login_user + (f"@{login_db}" if login_db else "")


@db.command(name="ls")
@click.option("--format", "fmt", type=FORMATS, default="text", show_default=True)
@PROXY_OPTION
@guarded
def db_ls(fmt: str, proxy: str) -> None:
    """List the databases you may reach (and as whom you are logged in to each)."""
    from wardgate.client.db import DBStore, visible_databases

    profile = _load(proxy)
    dbs = runtime.run(visible_databases(profile))
    logins = {x.name: x for x in DBStore(profile).logins()}
    if fmt != "text":
        out = []
        for d in dbs:
            login = logins.get(str(d.get("name")))
            out.append(
                {
                    **d,
                    "logged_in": login is not None and not login.is_expired(),
                    "login": login.to_dict() if login is not None else None,
                }
            )
        dump(out, fmt)
        return
    rows = []
    for d in dbs:
        login = logins.get(str(d.get("name")))
        mark = ""
        if login is not None:
            mark = _as_text(login.db_user, login.db_name) + (" [EXPIRED]" if login.is_expired() else "")
        rows.append(
            [
                ("> " if mark else "") + str(d.get("name", "")),
                d.get("description", ""),
                d.get("protocol", ""),
                ",".join(f"{k}={v}" for k, v in sorted((d.get("labels") or {}).items())),
                _db_users_text(d),
                mark,
            ]
        )
    table(
        ["Name", "Description", "Protocol", "Labels", "DB users", "Logged in as"],
        rows,
        empty="No databases: none are served, or your roles let you see none.",
    )


@db.command(name="login")
@click.argument("name")
@click.option(
    "--db-user", default="", help="Database user to connect as (default: the previous one, or your only one)."
)
@click.option(
    "--db-name",
    default="",
    help="Database on the server (default: the previous one, or the server's default).",
)
@PROXY_OPTION
@guarded
def db_login(name: str, db_user: str, db_name: str, proxy: str) -> None:
    """Get a certificate for database NAME as a database user.

    It is kept in ~/.ward until it expires (at the latest when your `ward login` does), with the
    db user and name, so `ward db connect` and `ward proxy db` need neither again.
    """
    from wardgate.client.db import db_login as do_login

    profile = _load(proxy)
    login = runtime.run(do_login(profile, name, db_user, db_name, ask_code=_ask_mfa_code))
    who = _as_text(login.db_user, login.db_name)
    console.print(
        f'Logged in to database "{name}" ({login.protocol}) as {who}, valid until '
        f"{login.valid_until:%Y-%m-%d %H:%M:%S} UTC.\n"
        f"Connect: ward db connect {name}    Local tunnel: ward proxy db {name} --tunnel",
        markup=False,
    )


def _logout(store: LoginStore, name: str | None, say: Callable[[str], object]) -> None:
    """`ward db logout` / `ward app logout`: forget NAME's certificate, or every one."""
    if name:
        if not store.remove(name):
            raise NotFoundError(f'not logged in to {store.noun} "{name}"')
        say(f'Logged out of {store.noun} "{name}".')
        return
    names = [x.name for x in store.logins()]
    for n in names:
        store.remove(n)
    say(f"Logged out of {', '.join(names)}." if names else f"Not logged in to any {store.noun}.")


@db.command(name="logout")
@click.argument("name", required=False)
@PROXY_OPTION
@guarded
def db_logout(name: str | None, proxy: str) -> None:
    """Forget the certificate of database NAME (without NAME: of every database)."""
    from wardgate.client.db import DBStore

    _logout(DBStore(_load(proxy, valid=False)), name, lambda text: console.print(text, markup=False))


@db.command(name="connect")
@click.argument("name")
@click.option("--db-user", default="", help="Database user (default: the one you logged in as).")
@click.option("--db-name", default="", help="Database on the server (default: the one you logged in to).")
@PROXY_OPTION
@click.argument("client_args", nargs=-1, type=click.UNPROCESSED)
@guarded
def db_connect(name: str, db_user: str, db_name: str, proxy: str, client_args: tuple[str, ...]) -> None:
    """Run psql, mariadb or mysql on database NAME, logging in first if needed.

    Arguments after `--` go to the client, e.g. `ward db connect pg -- -c 'select 1'`. The exit
    code is the client's.
    """
    from wardgate.client.db import (
        DBStore,
        DBTunnel,
        client_argv,
        client_env,
        ensure_login,
        find_client,
        run_client,
    )

    profile = _load(proxy, valid=False)
    store = DBStore(profile)
    login = runtime.run(ensure_login(profile, name, db_user, db_name, store=store, ask_code=_ask_mfa_code))
    login.require_valid()
    client = find_client(login.protocol)
    extra = list(client_args[1:] if client_args[:1] == ("--",) else client_args)

    t = DBTunnel(profile, name, store=store, on_error=_warn)
    rc = runtime.run(
        run_client(
            t,
            lambda port: client_argv(client, port, login.db_user, login.db_name, extra),
            client_env(login.protocol),
        )
    )
    sys.exit(rc)


def _db_login_for(name: str, proxy: str) -> tuple[Profile, DBLogin]:
    from wardgate.client.db import DBStore

    profile = _load(proxy, valid=False)
    return profile, DBStore(profile).load(name)


@db.command(name="env")
@click.argument("name")
@click.option(
    "--port",
    type=click.IntRange(1, 65535),
    default=None,
    help="The port `ward proxy db NAME --tunnel` listens on.",
)
@PROXY_OPTION
@guarded
def db_env(name: str, port: int | None, proxy: str) -> None:
    """Print shell exports for database NAME.

    With the port of a running `ward proxy db NAME --tunnel`, plain psql then works:

    \b
    eval "$(ward db env NAME --port=N)"; psql
    """
    from wardgate.client.db import env_lines

    _, login = _db_login_for(name, proxy)
    click.echo("\n".join(env_lines(login, port)))


@db.command(name="config")
@click.argument("name")
@click.option("--format", "fmt", type=FORMATS, default="text", show_default=True)
@PROXY_OPTION
@guarded
def db_config(name: str, fmt: str, proxy: str) -> None:
    """Show the login of database NAME: db user and name, certificate files, expiry."""
    profile, login = _db_login_for(name, proxy)
    info = login.describe(profile)
    if fmt != "text":
        dump(info, fmt)
        return
    until = f"{login.valid_until:%Y-%m-%d %H:%M:%S} UTC" + (" [EXPIRED]" if info["expired"] else "")
    details(
        [
            ("Name", login.name),
            ("Protocol", login.protocol),
            ("Proxy", f"{profile.proxy} (ALPN {info['alpn']})"),
            ("DB user", login.db_user),
            ("DB name", login.db_name or "(the server's default)"),
            ("Certificate", info["cert"]),
            ("Key", info["key"]),
            ("CA", info["ca"]),
            ("Local CA", f"{info['local_ca']} (what `ward proxy db {login.name}` clients verify it by)"),
            ("Valid until", until),
        ]
    )


# ---------------------------------------------------------------- applications


@main.group()
def apps() -> None:
    """Applications you may reach through the proxy."""


@apps.command(name="ls")
@click.option(
    "--format",
    "fmt",
    type=FORMATS,
    default="text",
    show_default=True,
    help="text: an aligned table; json or yaml: every field, and whether you hold a certificate.",
)
@PROXY_OPTION
@guarded
def apps_ls(fmt: str, proxy: str) -> None:
    """List the apps you may reach: name, type (http or tcp), public address, description, labels."""
    from wardgate.client.app import AppStore, visible_apps

    profile = _load(proxy)
    found = runtime.run(visible_apps(profile))
    if fmt != "text":
        store = AppStore(profile)
        dump([{**a, "logged_in": store.current(str(a.get("name"))) is not None} for a in found], fmt)
        return
    table(
        ["Name", "Type", "Public address", "Description", "Labels"],
        [
            [
                a.get("name", ""),
                a.get("uri_kind", ""),
                a.get("public_addr", ""),
                a.get("description", ""),
                ",".join(f"{k}={v}" for k, v in sorted((a.get("labels") or {}).items())),
            ]
            for a in found
        ],
        empty="No apps: none are served, or your roles let you see none.",
    )


@main.group()
def app() -> None:
    """One application: log in for curl and other clients, log out, show the settings."""


@app.command(name="login")
@click.argument("name")
@PROXY_OPTION
@guarded
def app_login(name: str, proxy: str) -> None:
    """Get a certificate for app NAME and print the command line that uses it.

    The certificate is for your `ward login` key and is kept in ~/.ward until it expires (at the
    latest when your `ward login` does). Asks for a one-time code when your roles require a
    second factor per session.
    """
    from wardgate.client.app import app_login as do_login
    from wardgate.client.app import command_line

    profile = _load(proxy)
    login = runtime.run(do_login(profile, name, ask_code=_ask_mfa_code))
    click.echo(
        f'Logged in to app "{name}" ({login.kind}, {login.uri}), valid until '
        f"{login.valid_until:%Y-%m-%d %H:%M:%S} UTC."
    )
    if login.kind == "tcp":
        click.echo(
            f"Reach it through a local listener: ward proxy app {name} --port=N\n"
            f"or by hand:\n\n  {command_line(login, profile)}"
        )
    else:
        click.echo(
            f"Use it with curl (`ward app config {name}` prints this again):\n\n"
            f"  {command_line(login, profile)}\n\n"
            f"or through a local listener that needs no certificates: ward proxy app {name}"
        )


@app.command(name="logout")
@click.argument("name", required=False)
@PROXY_OPTION
@guarded
def app_logout(name: str | None, proxy: str) -> None:
    """Forget the certificate of app NAME (without NAME: of every app)."""
    from wardgate.client.app import AppStore

    _logout(AppStore(_load(proxy, valid=False)), name, click.echo)


@app.command(name="config")
@click.argument("name")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["curl", "uri", "ca", "cert", "key", "json"]),
    default="curl",
    show_default=True,
    help="curl: a ready command line (curl for HTTP apps, openssl s_client for TCP apps); uri: the "
    "app's address; ca, cert, key: a file to give other clients; json: all of it.",
)
@PROXY_OPTION
@guarded
def app_config(name: str, fmt: str, proxy: str) -> None:
    """Print how to reach app NAME with your certificate from `ward app login`.

    When the app's host name has no address on this machine (e.g. NAME.localhost) but the
    proxy's has, the curl line adds --resolve so the name reaches the proxy.
    """
    from wardgate.client.app import AppStore, config_text

    profile = _load(proxy, valid=False)
    login = AppStore(profile).load(name)
    click.echo(config_text(login, profile, fmt))
    if login.is_expired():
        _warn(
            f'your certificate for app "{name}" expired at {login.valid_until:%Y-%m-%d %H:%M:%S} UTC: '
            f"run `ward app login {name}` again"
        )
    elif not login.matches_key():
        _warn(
            f'your certificate for app "{name}" is for the key of an earlier `ward login`: '
            f"run `ward app login {name}` again"
        )


@main.command()
@click.argument("session_id")
@click.option(
    "--mode",
    type=click.Choice(["observer", "peer"]),
    default="observer",
    show_default=True,
    help="observer watches; peer may also type (your roles' join_sessions decide).",
)
@click.option("-l", "--login", "login_opt", default="", help="Your login on that node (default: your first).")
@PROXY_OPTION
@guarded
def join(session_id: str, mode: str, login_opt: str, proxy: str) -> None:
    """Join someone's live session (its id is WARD_SESSION_ID inside it, or in the audit log)."""
    import uuid

    from wardgate.client.proxyclient import ProxyClient
    from wardgate.client.ssh import exec_program, join_argv, split_login

    try:
        sid = str(uuid.UUID(session_id))
    except ValueError:
        raise BadParameterError(f"{session_id!r} is not a session id") from None
    profile = _load(proxy)

    async def find() -> dict:
        async with ProxyClient.for_profile(profile) as c:
            return await c.find_session(sid)

    info = runtime.run(find())
    if not info["active"]:
        raise BadParameterError(f"session {sid} has ended: replay it with `ward play {sid}`")
    node = info["server_hostname"] or info["server_id"]
    login_name, node = split_login(node, login_opt, profile)
    err_console.print(f"Joining {info['user']}'s session on {node} as {mode} (Ctrl-D or ~. to leave).")
    exec_program(join_argv(profile, node, login_name, sid, mode))


@main.command()
@click.argument("session_id")
@click.option("--speed", default=1.0, show_default=True, help="Playback speed factor (2 = twice as fast).")
@click.option(
    "--max-idle", default=2.0, show_default=True, help="Cap pauses at this many seconds (0: no cap)."
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["play", "json", "cast", "text"]),
    default="play",
    show_default=True,
    help="play in the terminal, or export: json (events), cast (asciicast v2), text (output only).",
)
@PROXY_OPTION
@guarded
def play(session_id: str, speed: float, max_idle: float, fmt: str, proxy: str) -> None:
    """Replay a recorded session (ids are in `wardctl recordings ls` and the audit log)."""
    import json
    import shutil

    from wardgate.audit import recording
    from wardgate.client.recordings import fetch_recording

    if speed <= 0:
        raise BadParameterError("--speed must be positive, like 1 or 2.5")
    path = runtime.run(fetch_recording(_load(proxy), session_id))
    try:
        if fmt == "json":
            click.echo(json.dumps(recording.export_json(path), indent=2))
        elif fmt == "cast":
            recording.export_cast(path, sys.stdout)
        elif fmt == "text":
            click.echo(recording.output_text(path), nl=False)
        else:
            recording.play(path, speed=speed, max_idle=max_idle or None)
    finally:
        shutil.rmtree(path.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
