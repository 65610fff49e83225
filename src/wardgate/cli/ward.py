"""`ward`: the user's client."""

from __future__ import annotations

import getpass
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import click

from wardgate import __version__, runtime
from wardgate.cli.output import FORMATS, console, details, dump, err_console, guarded, table
from wardgate.errors import AuthenticationError, BadParameterError

if TYPE_CHECKING:
    from wardgate.client.profile import Profile


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

    def ask_code() -> str:
        return str(click.prompt("Your roles require MFA for each session. One-time code", err=True))

    mfa = runtime.run(session_mfa_options(profile, node, ask_code))
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
