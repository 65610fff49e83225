"""Local listeners for native clients: `ward proxy db [--tunnel]`, `ward proxy app`.

Every connection a local client makes gets its own TLS connection to the proxy's one port,
carrying a certificate routed to one resource (a database, an app), and the two are relayed
both ways by `wardgate.proxy.relay` (256 KiB buffers, back-pressure, half-close). Nothing the
local client sends reaches the proxy before the TLS handshake is done and the subclass has
checked the proxy's answer (ALPN, and for apps the proxy's identity): until then it waits in a
`Held` protocol that stops reading after one buffer's worth.

Subclasses say which certificate to use (`prepare`, re-run for every connection so a login in
another terminal is picked up), how to dial (`dial_params`), and how to word failures.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import ipaddress
import logging
import signal
import ssl
from asyncio import sslproto
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from wardgate.api.client import ConnectionFailed
from wardgate.client.profile import Profile, split_host_port
from wardgate.errors import AccessDeniedError, BadParameterError, WardgateError
from wardgate.proxy.relay import Relay, RelayStats
from wardgate.streams import deliver

log = logging.getLogger(__name__)

BUFFER_SIZE = 256 * 1024
LOCAL_HOST = "127.0.0.1"

ErrorSink = Callable[[str], None]
L = TypeVar("L")


def server_hostname(host: str) -> str | None:
    """SNI for a host name; none for an IP address (TLS does not allow one)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return host
    return None


def unreachable(profile: Profile, exc: BaseException) -> ConnectionFailed:
    return ConnectionFailed(
        f"cannot reach the proxy at {profile.proxy} ({exc or type(exc).__name__}): "
        "check the address and that the Wardgate proxy is running"
    )


def tls_failure(
    profile: Profile,
    exc: ssl.SSLError,
    *,
    subject: str,
    relogin: str,
    expired: Callable[[str], WardgateError],
) -> WardgateError:
    """What a failed TLS exchange with the proxy means for the person: our side (CA, expired or
    refused certificate, with the command that fixes it) or the proxy's."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return ConnectionFailed(
            f"cannot verify the proxy at {profile.proxy}: {exc.verify_message or exc}: it is not a proxy "
            f"of cluster {profile.cluster}, or the cluster's CA changed (run `ward login` again)"
        )
    text = str(exc)
    if "expired" in text.lower():
        return expired(
            f"the proxy refused your certificate for {subject}: it has expired; run `{relogin}` again"
        )
    if "alert" in text.lower():
        return AccessDeniedError(
            f"the proxy refused your certificate for {subject} ({exc.reason or text}): run `{relogin}` again"
        )
    return ConnectionFailed(f"TLS with the proxy at {profile.proxy} failed: {text}")


class Held(asyncio.Protocol):
    """A connection waiting for the relay: keeps what arrives (reading stops after one buffer's
    worth, so a fast sender cannot make us hoard) and whether its peer finished or left.

    `wait_for` and `take` let a subclass's `greet` read a protocol's first messages (and answer
    them, or upgrade the connection to TLS) before the relay takes over what is left.
    """

    def __init__(self, limit: int, on_made: Callable[[Held], None] | None = None) -> None:
        self.limit = limit
        self.on_made = on_made
        self.transport: Any = None
        self.chunks: list[bytes] = []
        self.size = 0
        self.eof = False
        self.lost = False
        self.error: BaseException | None = None
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        if self.on_made is not None:
            self.on_made(self)

    def data_received(self, data: bytes) -> None:
        self.chunks.append(data)
        self.size += len(data)
        if self.size >= self.limit and not self._paused:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return bool(self.transport.can_write_eof())  # TCP stays open to write; TLS closes

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.error = exc
        self._wake()

    def pending(self) -> bytes:
        return b"".join(self.chunks)

    async def wait_for(self, n: int) -> bool:
        """Until `n` bytes are here (True) or the peer finished or left first (False)."""
        if n > self.limit:
            raise ValueError(f"cannot hold {n} bytes (the limit is {self.limit})")
        while self.size < n:
            if self.eof or self.lost:
                return False
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return True

    def take(self, n: int) -> bytes:
        """The first `n` bytes held (call `wait_for(n)` first); reading resumes if it had stopped."""
        data = self.pending()
        head, rest = data[:n], data[n:]
        self.chunks = [rest] if rest else []
        self.size = len(rest)
        if self._paused and self.size < self.limit and not self.lost:
            self._paused = False
            self.transport.resume_reading()
        return head

    async def start_tls_server(
        self, ctx: ssl.SSLContext, handshake_timeout: float, *, held_is_tls: bool = False
    ) -> None:
        """Upgrade this (accepted) connection to TLS as the server; what follows arrives decrypted.

        Bytes already held are the start of the client's handshake when `held_is_tls` (MySQL's
        client sends its ClientHello right behind the SSLRequest, with no answer to wait for);
        otherwise the caller refuses a client that sent anything before the answer (plaintext
        must not leak into the encrypted stream). asyncio's `start_tls` cannot be given bytes
        already read, so the TLS protocol is attached here and fed them first.
        """
        loop = asyncio.get_running_loop()
        early = self.take(self.size) if held_is_tls else b""
        waiter: asyncio.Future[None] = loop.create_future()
        tls = sslproto.SSLProtocol(
            loop,
            self,
            ctx,
            waiter,
            server_side=True,
            ssl_handshake_timeout=handshake_timeout,
            call_connection_made=False,
        )
        raw = self.transport
        raw.pause_reading()
        raw.set_protocol(tls)
        tls.connection_made(raw)
        if early:
            deliver(tls, early)
        raw.resume_reading()
        try:
            await waiter
        except BaseException:
            raw.close()
            raise
        self.transport = tls._app_transport  # what loop.start_tls returns, too


@dataclass(frozen=True)
class TLSDial:
    """How one connection reaches the proxy: the context (certificate, CA, ALPN) and the SNI."""

    ctx: ssl.SSLContext
    server_hostname: str | None


class LocalTunnel(abc.ABC, Generic[L]):
    """A local listener; every connection it accepts gets its own TLS connection to the proxy.

    Per-connection problems go to `on_error` (one line each); the listener keeps going.
    """

    def __init__(
        self,
        profile: Profile,
        subject: str,
        *,
        on_error: ErrorSink | None = None,
        dial_timeout: float = 30.0,
        buffer_size: int = BUFFER_SIZE,
    ) -> None:
        self.profile = profile
        self.subject = subject
        """What the connections reach, for messages: `database "pg"`, `app "grafana"`."""
        self.on_error = on_error or (lambda msg: log.warning("%s", msg))
        self.dial_timeout = dial_timeout
        self.buffer_size = buffer_size
        self.connections = 0
        """Connections accepted so far."""
        self.failures = 0
        """Connections that ended with a problem reported to `on_error`."""
        self._server: asyncio.AbstractServer | None = None
        self._waiting: set[Held] = set()
        self._relays: set[Relay] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._proxy_host, self._proxy_port = split_host_port(profile.proxy)

    # ---- what subclasses decide

    @abc.abstractmethod
    async def prepare(self) -> L:
        """The login this connection uses (raise a WardgateError with the fix if there is none)."""

    @abc.abstractmethod
    def dial_params(self, login: L) -> TLSDial: ...

    @abc.abstractmethod
    def tls_failure(self, login: L, exc: ssl.SSLError) -> WardgateError: ...

    @abc.abstractmethod
    def check_peer(self, login: L, ssl_object: ssl.SSLObject | None) -> None:
        """Raise unless the proxy answered as it should (ALPN, identity) before any byte goes."""

    async def greet_local(self, local: Held, login: L) -> bool:
        """Before dialling: what this mode does with the local client first (by default nothing).

        False ends the connection quietly (the client left); a WardgateError ends it with a
        warning, after the subclass told the client why in its own protocol.
        """
        return True

    async def greet_remote(self, local: Held, remote: Held, login: L) -> bool:
        """After dialling, before the relay: as `greet_local`, with the proxy's stream at hand."""
        return True

    def check_end(self, login: L, stats: RelayStats) -> None:
        """Turn how a relay ended into a message, when it ended badly."""
        if isinstance(stats.error, ssl.SSLError):
            raise self.tls_failure(login, stats.error)

    # ---- the listener

    @property
    def port(self) -> int:
        return self.address[1]

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) the listener is bound to."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("the tunnel is not listening")
        name = self._server.sockets[0].getsockname()
        return str(name[0]), int(name[1])

    @property
    def active(self) -> int:
        """Connections being dialled or relayed right now."""
        return len(self._tasks)

    async def start(self, host: str = LOCAL_HOST, port: int = 0) -> int:
        """Listen on host:port (0: any free port); returns the port."""
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(
                lambda: Held(self.buffer_size, self._accepted), host, port
            )
        except OSError as exc:
            raise BadParameterError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        return self.port

    async def close(self) -> None:
        """Stop listening and cut every open connection."""
        if self._server is not None:
            self._server.close()
        for held in list(self._waiting):
            held.transport.abort()
        for r in list(self._relays):
            r.abort()
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)

    async def __aenter__(self) -> LocalTunnel[L]:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _accepted(self, local: Held) -> None:
        self.connections += 1
        self._waiting.add(local)
        task = asyncio.get_running_loop().create_task(self._serve(local))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _report(self, message: str) -> None:
        self.failures += 1
        with contextlib.suppress(Exception):
            self.on_error(message)

    async def _serve(self, local: Held) -> None:
        try:
            await self._relay(local)
        except WardgateError as exc:
            self._report(str(exc))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # never let one connection take the listener down
            log.debug("local tunnel connection to %s failed", self.subject, exc_info=True)
            self._report(f"connection to {self.subject} failed: {exc!r}")
        finally:
            self._waiting.discard(local)
            if not local.lost and local.transport is not None and local.transport.get_protocol() is local:
                local.transport.close()  # never taken over by a relay: don't leave the client hanging

    async def _dial(self, login: L) -> Held:
        loop = asyncio.get_running_loop()
        remote = Held(self.buffer_size)
        how = self.dial_params(login)
        try:
            async with asyncio.timeout(self.dial_timeout):
                await loop.create_connection(
                    lambda: remote,
                    self._proxy_host,
                    self._proxy_port,
                    ssl=how.ctx,
                    server_hostname=how.server_hostname,
                )
        except ssl.SSLError as exc:
            raise self.tls_failure(login, exc) from None
        except (OSError, TimeoutError) as exc:
            raise unreachable(self.profile, exc) from None
        return remote

    async def _relay(self, local: Held) -> None:
        login = await self.prepare()
        if not await self.greet_local(local, login):
            return
        try:
            remote = await self._dial(login)
        except WardgateError:
            if local.lost or (local.eof and not local.size):
                return  # the client left before the proxy answered: nothing to report
            raise
        try:
            if local.lost:
                remote.transport.abort()
                return
            self.check_peer(login, remote.transport.get_extra_info("ssl_object"))
            if remote.lost and isinstance(remote.error, ssl.SSLError):
                raise self.tls_failure(login, remote.error)
            if not await self.greet_remote(local, remote, login):
                remote.transport.abort()
                return
        except BaseException:
            remote.transport.abort()
            raise
        r = Relay(buffer_size=self.buffer_size)
        self._relays.add(r)
        self._waiting.discard(local)
        try:
            r.attach_a(local.transport, pending=local.pending(), eof=local.eof)
            r.attach_b(remote.transport, pending=remote.pending(), eof=remote.eof)
            stats = await r.run()
        finally:
            self._relays.discard(r)
        self.check_end(login, stats)


async def serve_tunnel(
    tunnel: LocalTunnel[Any],
    *,
    host: str = LOCAL_HOST,
    port: int = 0,
    on_ready: Callable[[int], None] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Run the tunnel until SIGINT/SIGTERM (or `stop` is set), then close it cleanly."""
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    await tunnel.start(host=host, port=port)
    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
    try:
        if on_ready is not None:
            on_ready(tunnel.port)
        await stop.wait()
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
        await tunnel.close()
