"""SSH through the proxy: the `ward-ssh` handshake, and stdin/stdout piping for OpenSSH's ProxyCommand.

Wire protocol (ALPN `ward-ssh`, mutual TLS with the user's X.509 certificate): the client sends
one JSON line `{"host", "port", "login"}`; the proxy answers one JSON line, `{"ok": true,
"node", "host_id"}` followed by raw SSH bytes both ways, or `{"ok": false, "error"[, "code"]}`
and closes. When our stdin ends we send TLS close_notify (a half-close) and keep copying the
proxy's output until it closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from wardgate.api.client import ConnectionFailed, ssl_hint
from wardgate.client.profile import NotLoggedInError, Profile, split_host_port
from wardgate.client.proxyclient import SSH_ALPN
from wardgate.client.tlsstream import open_tls_connection
from wardgate.errors import ERRORS_BY_CODE, AccessDeniedError, BadParameterError, WardgateError

CHUNK = 256 * 1024
MAX_ANSWER = 64 * 1024
DEFAULT_SSH_PORT = 22


@dataclass(frozen=True)
class SSHTarget:
    login: str
    host: str
    port: int
    """0 lets the proxy use the node's registered address."""


def parse_proxy_target(spec: str, profile: Profile) -> SSHTarget:
    """`login@host[:port]` as OpenSSH's `%r@%h:%p` produces it, minus the `.<cluster>` suffix.

    OpenSSH always fills `%p` (22 when the user gave no port), so 22 is sent as 0: "the node's
    registered address". Any other port is passed on for the proxy to use.
    """
    login, at, hostport = spec.rpartition("@")
    if not at:
        login, hostport = "", spec
    if not login:
        if not profile.logins:
            raise BadParameterError("no login given and your roles grant none: use LOGIN@HOST")
        login = profile.logins[0]
    host, port = hostport, DEFAULT_SSH_PORT
    if hostport.startswith("[") and "]" in hostport:
        host, _, rest = hostport[1:].partition("]")
        if rest.startswith(":") and rest[1:].isdigit():
            port = int(rest[1:])
    elif hostport.count(":") == 1:
        host, _, port_text = hostport.partition(":")
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise BadParameterError(f"bad port in {spec!r}: expected LOGIN@HOST:PORT")
        port = int(port_text)
    host = strip_cluster(host, profile.cluster)
    if not host:
        raise BadParameterError(f"no host in {spec!r}: expected LOGIN@HOST:PORT")
    return SSHTarget(login=login, host=host, port=0 if port == DEFAULT_SSH_PORT else port)


def strip_cluster(host: str, cluster: str) -> str:
    """`web1.<cluster>` → `web1`: the suffix only routes OpenSSH to our ssh_config block."""
    suffix = "." + cluster.lower()
    if cluster and host.lower().endswith(suffix) and len(host) > len(suffix):
        return host[: -len(suffix)]
    return host


def _server_hostname(host: str) -> str | None:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return host
    return None  # no SNI for IP addresses


def _ssh_ssl_context(profile: Profile) -> ssl.SSLContext:
    """The login certificate, or, once, the per-session MFA certificate `ward ssh` just got."""
    mfa = profile.session_mfa_tls_path
    try:
        ctx = profile.ssl_context(SSH_ALPN, cert_path=mfa)
    except NotLoggedInError:
        return profile.ssl_context(SSH_ALPN)
    mfa.unlink(missing_ok=True)  # one connection only: the next session asks for a factor again
    return ctx


async def open_ssh_stream(
    profile: Profile, host: str, port: int, login: str, *, dial_timeout: float = 30.0
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Dial the proxy with ALPN `ward-ssh`, ask for `login@host`, return the SSH byte stream."""
    profile.require_valid()
    ctx = _ssh_ssl_context(profile)
    phost, pport = split_host_port(profile.proxy)
    try:
        reader, writer = await asyncio.wait_for(
            open_tls_connection(phost, pport, ctx, server_hostname=_server_hostname(phost)), dial_timeout
        )
    except ssl.SSLCertVerificationError as exc:
        raise ConnectionFailed(
            f"cannot verify the proxy at {profile.proxy}: {exc.verify_message or exc}: it is not a proxy of "
            f"cluster {profile.cluster}, or the cluster's CA changed (run `ward login` again)"
        ) from None
    except ssl.SSLError as exc:
        raise ConnectionFailed(ssl_hint(profile.proxy, exc, "proxy")) from None
    except (OSError, TimeoutError) as exc:
        raise ConnectionFailed(
            f"cannot reach the proxy at {profile.proxy} ({exc or type(exc).__name__}): "
            "check the address and that the Wardgate proxy is running"
        ) from None
    try:
        alpn = writer.get_extra_info("selected_alpn")
        if alpn not in (None, SSH_ALPN):
            raise ConnectionFailed(
                f"the proxy at {profile.proxy} chose protocol {alpn!r} instead of {SSH_ALPN!r}: "
                "is it a Wardgate proxy?"
            )
        request = {"host": host, "port": int(port), "login": login}
        writer.write(json.dumps(request).encode() + b"\n")
        line = await asyncio.wait_for(_read_answer(reader), dial_timeout)
    except ssl.SSLError as exc:
        writer.close()
        raise ConnectionFailed(ssl_hint(profile.proxy, exc, "proxy")) from None
    except (OSError, TimeoutError) as exc:
        writer.close()
        raise ConnectionFailed(
            f"the proxy at {profile.proxy} dropped the connection ({exc or type(exc).__name__})"
        ) from None
    except BaseException:
        writer.close()
        raise
    try:
        answer = json.loads(line)
        if not isinstance(answer, dict):
            raise ValueError("not an object")
    except ValueError:
        writer.close()
        raise WardgateError(f"unexpected answer from the proxy at {profile.proxy}: {line[:80]!r}") from None
    if answer.get("ok") is True:
        return reader, writer
    writer.close()
    err_cls = ERRORS_BY_CODE.get(str(answer.get("code", "")), AccessDeniedError)
    raise err_cls(f"cannot connect to {login}@{host}: {answer.get('error') or 'refused by the proxy'}")


async def _read_answer(reader: asyncio.StreamReader) -> bytes:
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            raise ConnectionFailed(
                "the proxy closed the connection without answering (was your certificate refused?)"
            ) from None
        line = exc.partial
    except asyncio.LimitOverrunError:
        raise WardgateError("the proxy's answer is too long: is it a Wardgate proxy?") from None
    if len(line) > MAX_ANSWER:
        raise WardgateError("the proxy's answer is too long: is it a Wardgate proxy?")
    return line


# ---------------------------------------------------------------- stdin/stdout piping


async def _fd_reader(fd: int) -> tuple[Callable[[], Awaitable[bytes]], Callable[[], None]]:
    """Read an fd with the event loop (pipes, sockets, ttys) or a thread (regular files)."""
    loop = asyncio.get_running_loop()
    pipe = open(os.dup(fd), "rb", buffering=0)  # noqa: SIM115, ASYNC230 - a dup of an open fd, owned by the transport
    reader = asyncio.StreamReader(limit=2 * CHUNK, loop=loop)
    try:
        transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), pipe)
    except (ValueError, OSError):
        pipe.close()
        return (lambda: loop.run_in_executor(None, os.read, fd, CHUNK)), (lambda: None)
    return (lambda: reader.read(CHUNK)), transport.close


async def _fd_writer(fd: int) -> tuple[Callable[[bytes], Awaitable[None]], Callable[[], Awaitable[None]]]:
    loop = asyncio.get_running_loop()
    pipe = open(os.dup(fd), "wb", buffering=0)  # noqa: SIM115, ASYNC230 - a dup of an open fd, owned by the transport
    try:
        transport, protocol = await loop.connect_write_pipe(
            lambda: asyncio.StreamReaderProtocol(asyncio.StreamReader()), pipe
        )
    except (ValueError, OSError):
        pipe.close()

        def write_all(data: bytes) -> None:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]

        async def write_file(data: bytes) -> None:
            await loop.run_in_executor(None, write_all, data)

        async def nothing_to_close() -> None:
            return None

        return write_file, nothing_to_close
    writer = asyncio.StreamWriter(transport, protocol, None, loop)

    async def write_pipe(data: bytes) -> None:
        writer.write(data)
        await writer.drain()

    async def close_pipe() -> None:
        """Close only once every buffered byte reached the pipe: returning earlier would end the
        event loop (and the process) with the tail of the output still in our buffer."""
        transport.close()
        with contextlib.suppress(OSError, ConnectionError):
            await writer.wait_closed()

    return write_pipe, close_pipe


async def relay_stdio(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, stdin_fd: int = 0, stdout_fd: int = 1
) -> None:
    """Copy stdin → stream and stream → stdout; half-close on stdin EOF; done when the stream ends."""
    blocking = {fd: os.get_blocking(fd) for fd in (stdin_fd, stdout_fd)}
    read_in, close_in = await _fd_reader(stdin_fd)
    write_out, close_out = await _fd_writer(stdout_fd)

    async def upstream() -> None:
        while data := await read_in():
            writer.write(data)
            await writer.drain()
        if not writer.is_closing():
            writer.write_eof()

    up = asyncio.create_task(upstream())
    try:
        while data := await reader.read(CHUNK):
            await write_out(data)
    except (BrokenPipeError, ConnectionResetError):
        pass  # ssh went away (it closes our stdout when it exits): nothing left to deliver
    finally:
        up.cancel()
        with contextlib.suppress(asyncio.CancelledError, OSError, RuntimeError):
            await up
        writer.close()
        close_in()
        await close_out()
        for fd, mode in blocking.items():
            with contextlib.suppress(OSError):
                os.set_blocking(fd, mode)


async def proxy_stdio(
    profile: Profile, host: str, port: int, login: str, *, stdin_fd: int = 0, stdout_fd: int = 1
) -> None:
    """`ward proxy ssh`: what OpenSSH runs as ProxyCommand."""
    reader, writer = await open_ssh_stream(profile, host, port, login)
    await relay_stdio(reader, writer, stdin_fd=stdin_fd, stdout_fd=stdout_fd)
