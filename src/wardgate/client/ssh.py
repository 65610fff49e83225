"""`ward ssh` and `ward scp`: run the real OpenSSH client with Wardgate's options.

We build the argv and `exec` OpenSSH, so everything it offers (terminals, forwarding, escape
sequences, scp's progress meter) behaves exactly as people know it, and its exit code is ours.
`-F none` keeps the user's and the system's ssh_config out, so a stray `Host *` line cannot
change which key, certificate or proxy is used. With a label selector, the command runs on every
matching node in parallel and each output line is prefixed with the node's name.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import sys
from collections.abc import Mapping, Sequence
from typing import BinaryIO

from wardgate.client.nodes import Selector
from wardgate.client.profile import Profile
from wardgate.client.sshconfig import ssh_options
from wardgate.errors import BadParameterError, WardgateError

# OpenSSH hands %r and %h to /bin/sh inside ProxyCommand: keep shell syntax out of them.
_LOGIN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.@+-]*\$?$")
_HOST = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


def check_login(login: str) -> str:
    if not _LOGIN.match(login):
        raise BadParameterError(f"bad login {login!r}: use letters, digits and . _ - + @")
    return login


def node_host(profile: Profile, node: str) -> str:
    """`web1` → `web1.<cluster>`: the name OpenSSH checks the host certificate against."""
    if not _HOST.match(node):
        raise BadParameterError(f"bad node name {node!r}: use a node name or host id (letters, digits, ._-)")
    suffix = "." + profile.cluster
    return node if node.lower().endswith(suffix.lower()) else node + suffix


def split_login(target: str, login: str, profile: Profile) -> tuple[str, str]:
    """`[login@]node` with `-l` and then the profile's first login as fallbacks."""
    user, at, host = target.rpartition("@")
    chosen = (user if at else "") or login
    if not chosen:
        if not profile.logins:
            raise BadParameterError(
                "your roles grant no logins, so there is no login to default to: pass LOGIN@NODE"
            )
        chosen = profile.logins[0]
    if not host:
        raise BadParameterError(f"no node in {target!r}: expected [LOGIN@]NODE")
    return check_login(chosen), host


def _option_args(profile: Profile, ward: list[str] | None, extra: Sequence[str]) -> list[str]:
    args = ["-F", "none"]
    for opt in extra:  # the user's -o come first: OpenSSH keeps the first value it sees
        args += ["-o", opt]
    for key, value in ssh_options(profile, ward=ward):
        args += ["-o", f"{key}={value}"]
    args += ["-o", "UpdateHostKeys=no"]
    return args


def ssh_argv(
    profile: Profile,
    node: str,
    login: str,
    command: Sequence[str] = (),
    *,
    port: int | None = None,
    local_forwards: Sequence[str] = (),
    remote_forwards: Sequence[str] = (),
    dynamic_forwards: Sequence[str] = (),
    forward_agent: bool = False,
    tty: int = 0,
    no_tty: bool = False,
    no_command: bool = False,
    batch: bool = False,
    verbose: int = 0,
    options: Sequence[str] = (),
    ssh: str = "ssh",
    ward: list[str] | None = None,
) -> list[str]:
    """The OpenSSH command line for `ward ssh`; nothing here touches the network."""
    argv = [ssh, *_option_args(profile, ward, options)]
    if batch:
        argv += ["-o", "BatchMode=yes", "-n"]
    if port:
        argv += ["-p", str(port)]
    for flag, specs in (("-L", local_forwards), ("-R", remote_forwards), ("-D", dynamic_forwards)):
        for spec in specs:
            argv += [flag, spec]
    if forward_agent:
        argv.append("-A")
    argv += ["-t"] * tty
    if no_tty:
        argv.append("-T")
    if no_command:
        argv.append("-N")
    if verbose:
        argv.append("-" + "v" * min(verbose, 3))
    # `--` ends OpenSSH's options, so the remote command's own flags are not taken as ssh's.
    argv += ["--", f"{check_login(login)}@{node_host(profile, node)}", *command]
    return argv


def is_remote(spec: str) -> bool:
    """scp's rule: a colon before any slash makes `host:path` remote; `./a:b` stays local."""
    colon = spec.find(":")
    return colon > 0 and "/" not in spec[:colon]


def scp_argv(
    profile: Profile,
    sources: Sequence[str],
    dest: str,
    *,
    login: str = "",
    recursive: bool = False,
    preserve: bool = False,
    port: int | None = None,
    quiet: bool = False,
    options: Sequence[str] = (),
    scp: str = "scp",
    ward: list[str] | None = None,
) -> list[str]:
    """The OpenSSH `scp` command line: each `[login@]node:path` becomes `login@node.<cluster>:path`."""
    if not sources:
        raise BadParameterError("scp needs a source and a destination")
    specs = [*sources, dest]
    if not any(is_remote(s) for s in specs):
        raise BadParameterError("neither source nor destination is remote: use [LOGIN@]NODE:PATH on one side")
    argv = [scp, *_option_args(profile, ward, options)]
    if recursive:
        argv.append("-r")
    if preserve:
        argv.append("-p")
    if quiet:
        argv.append("-q")
    if port:
        argv += ["-P", str(port)]
    argv.append("--")
    for spec in specs:
        if is_remote(spec):
            target, _, path = spec.partition(":")
            user, node = split_login(target, login, profile)
            argv.append(f"{user}@{node_host(profile, node)}:{path}")
        else:
            argv.append(spec)
    return argv


def find_program(name: str) -> str:
    path = shutil.which(name)
    if not path:
        raise WardgateError(f"OpenSSH `{name}` was not found on PATH: install the OpenSSH client")
    return path


def exec_program(argv: list[str]) -> None:
    """Replace this process with OpenSSH: its terminal handling and exit code become ours."""
    path = find_program(argv[0])
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(path, argv)  # noqa: S606 - replacing ourselves with OpenSSH is the point


JOIN_SUBSYSTEM = "join@wardgate"


def join_argv(
    profile: Profile, node: str, login: str, sid: str, mode: str, *, ward: list[str] | None = None
) -> list[str]:
    """`ward join`: the node's join subsystem, with the session and mode as environment."""
    argv = ssh_argv(
        profile,
        node,
        login,
        [JOIN_SUBSYSTEM],
        tty=1,
        ward=ward,
        options=[f"SetEnv=WARD_JOIN_SID={sid} WARD_JOIN_MODE={mode}"],
    )
    argv.insert(argv.index("--"), "-s")
    return argv


# ---------------------------------------------------------------- many nodes at once


async def _prefix_lines(stream: asyncio.StreamReader, out: BinaryIO, prefix: bytes) -> None:
    """Copy lines with a prefix, one write per line so parallel nodes never interleave mid-line."""
    pending = b""
    while chunk := await stream.read(65536):
        pending += chunk
        *lines, pending = pending.split(b"\n")
        if lines:
            out.write(b"".join(prefix + line + b"\n" for line in lines))
            out.flush()
    if pending:
        out.write(prefix + pending + b"\n")
        out.flush()


async def run_on_nodes(
    argvs: Mapping[str, list[str]],
    *,
    stdout: BinaryIO | None = None,
    stderr: BinaryIO | None = None,
    parallel: int = 32,
) -> int:
    """Run one OpenSSH per node, `[node] `-prefixed output; the exit code is the worst one."""
    out = stdout or sys.stdout.buffer
    err = stderr or sys.stderr.buffer
    limit = asyncio.Semaphore(parallel)

    async def one(name: str, argv: list[str]) -> int:
        async with limit:
            try:
                proc = await asyncio.create_subprocess_exec(
                    find_program(argv[0]),
                    *argv[1:],
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                )
            except OSError as exc:
                err.write(f"[{name}] cannot start {argv[0]}: {exc}\n".encode())
                return 255
            prefix = f"[{name}] ".encode()
            assert proc.stdout is not None and proc.stderr is not None
            await asyncio.gather(
                _prefix_lines(proc.stdout, out, prefix), _prefix_lines(proc.stderr, err, prefix)
            )
            code = await proc.wait()
            return 128 + signal.Signals(-code).value if code < 0 else code

    codes = await asyncio.gather(*(one(name, argv) for name, argv in argvs.items()))
    return max(codes, default=0)


def argvs_for_nodes(
    profile: Profile,
    nodes: Sequence[Mapping[str, object]],
    selector: Selector,
    login: str,
    command: Sequence[str],
    **ssh_kwargs: object,
) -> dict[str, list[str]]:
    """One non-interactive OpenSSH command line per matching node, keyed by node name."""
    if not command:
        raise BadParameterError(f"running on every node matching {selector} needs a command")
    matched = [n for n in nodes if selector.matches(n)]
    if not matched:
        raise BadParameterError(f"no node you can see matches {selector}")
    out = {}
    for n in matched:
        name = str(n.get("name", ""))
        out[name] = ssh_argv(
            profile,
            name,
            login,
            command,
            no_tty=True,
            batch=True,
            **ssh_kwargs,  # type: ignore[arg-type]
        )
    return out
