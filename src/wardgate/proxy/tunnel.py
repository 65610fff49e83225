"""The proxy's end of reverse tunnels: accept agents on ALPN `ward-tunnel`, dial them by host id.

An agent (SSH node, app, db, kube or desktop service) dials the proxy's TLS port and keeps the
connection open (see `agent/tunnel.py` for its side and the wire contract). The router hands
each such connection to `TunnelServer.handle`, which:

1. authenticates the agent by its TLS client certificate: issued by the cluster's host CA
   (`verify_tls_identity`), with an agent system role (`node`, `app`, `db`, `kube`,
   `desktop`) and a host id. Anything else (a user certificate, a proxy's or admin's host
   certificate, no certificate) is logged, reported to `on_refused` and closed;
2. runs an asyncssh **client** over the TLS stream: the stream is `attach`ed to the
   `SSHClientConnection` through a `tunnel=` object whose `create_connection` hands asyncssh
   the already-connected transport, so asyncssh needs no socket of its own. The agent is the
   SSH server, which is what lets the proxy open standard `direct-tcpip` channels naming any
   service; SSH needs no authentication of its own here because TLS already did it both ways;
3. registers the tunnel under the agent's host id (a newer tunnel from the same host replaces
   the older one) until it closes, is replaced, stays silent for `keepalive_interval *
   keepalive_count_max` seconds (SSH keep-alives probe it meanwhile), or its certificate
   expires.

`dial(host_id, service)` then opens one channel per client connection, with the service name as
the destination host and the client's address as the originator, and returns asyncssh's
stream pair (`SSHReader`/`SSHWriter`: the asyncio stream API with `write_eof`). `pipe` relays
two such stream pairs with half-close, and `relay(conn, host_id, service)` does the whole job
for a routed client connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

import asyncssh
from cryptography import x509

from wardgate.auth.certs import verify_tls_identity
from wardgate.auth.identity import Identity
from wardgate.errors import AuthenticationError, NotFoundError, WardgateError
from wardgate.protocols.tunnel import (
    CHANNEL_MAX_PKTSIZE,
    CHANNEL_WINDOW,
    COMPRESSION_ALGS,
    ENCRYPTION_ALGS,
    MAC_ALGS,
    TUNNEL_ALPN,
    asyncssh_keepalive,
    format_client_addr,
    parse_client_addr,
)
from wardgate.proxy.relay import DEFAULT_BUFFER_SIZE
from wardgate.proxy.router import TLSConnection

__all__ = [
    "AGENT_ROLES",
    "TUNNEL_ALPN",
    "TunnelConnection",
    "TunnelDialError",
    "TunnelServer",
    "pipe",
    "ssh_refusal",
    "stream_pair",
]

log = logging.getLogger(__name__)

AGENT_ROLES = frozenset({"node", "app", "db", "kube", "desktop"})
"""System roles that may hold a tunnel; `proxy`, `auth` and `admin` certificates may not."""
PROXY_SSH_USER = "wardgate-proxy"
"""The user name the proxy's SSH client announces; the agent accepts it without checks."""

OnChange = Callable[[str, bool], None]
"""`on_change(host_id, connected)`: a tunnel registered (True, also on replacement) or gone."""
OnRefused = Callable[[str, str, Identity | None], None]
"""`on_refused(remote_addr, reason, identity)`: for the audit log; identity when one was read."""


class TunnelDialError(WardgateError):
    """The agent is connected but the channel could not be opened (refused, gone, too slow)."""

    status = 502
    code = "tunnel_dial_failed"


class _Attach:
    """The `tunnel=` object for `asyncssh.connect`: instead of dialling, attach asyncssh's
    connection protocol to the TLS stream the router already accepted."""

    def __init__(self, conn: TLSConnection) -> None:
        self.conn = conn

    async def create_connection(
        self, session_factory: Callable[[], asyncio.Protocol], host: str, port: int
    ) -> tuple[asyncio.Transport, asyncio.Protocol]:
        session = session_factory()
        self.conn.attach(session)
        return self.conn.transport, session


class TunnelConnection:
    """One agent's live tunnel: who it is, where from, and a way to open channels to it."""

    def __init__(self, identity: Identity, ssh: asyncssh.SSHClientConnection, remote: str) -> None:
        self.identity = identity
        self.host_id = identity.host_id
        self.system_role = identity.system_role
        self.remote = remote
        self.since = datetime.now(UTC)
        self.channels_opened = 0
        self.closed = False
        self._ssh = ssh
        self._expiry: asyncio.TimerHandle | None = None

    def __repr__(self) -> str:
        return f"<TunnelConnection host={self.host_id} role={self.system_role} from={self.remote}>"

    async def dial(
        self, service: str, *, client_addr: str = "", open_timeout: float | None = 10.0
    ) -> tuple[asyncssh.SSHReader[bytes], asyncssh.SSHWriter[bytes]]:
        """Open a channel to `service` on this agent, on behalf of the client at `client_addr`."""
        if self.closed:
            raise NotFoundError(f"the tunnel from host {self.host_id} has closed")
        orig_host, orig_port = parse_client_addr(client_addr)
        try:
            async with asyncio.timeout(open_timeout):
                reader, writer = await self._ssh.open_connection(
                    service,
                    0,
                    orig_host,
                    orig_port,
                    window=CHANNEL_WINDOW,
                    max_pktsize=CHANNEL_MAX_PKTSIZE,
                )
        except asyncssh.ChannelOpenError as exc:
            raise TunnelDialError(f"host {self.host_id} refused {service!r}: {exc.reason}") from None
        except TimeoutError:
            raise TunnelDialError(
                f"host {self.host_id} did not answer a request for {service!r} within {open_timeout}s"
            ) from None
        except (asyncssh.Error, OSError) as exc:
            raise TunnelDialError(
                f"the tunnel from host {self.host_id} failed while opening {service!r}: {exc}"
            ) from None
        self.channels_opened += 1
        return reader, writer

    def close(self) -> None:
        """Disconnect politely; the agent will reconnect after its back-off."""
        self._ssh.close()

    def abort(self) -> None:
        self._ssh.abort()

    async def wait_closed(self) -> None:
        await self._ssh.wait_closed()


class TunnelServer:
    """The registry of agents' tunnels on this proxy, and the `ward-tunnel` route handler.

    `host_ca_certs()` returns the host CA certificates trusted right now (called per connection,
    so CA rotation needs no restart). `authorize(identity)`, when given, may raise a
    `WardgateError` (e.g. a lock on the host) to refuse an otherwise valid agent.
    """

    def __init__(
        self,
        host_ca_certs: Callable[[], list[x509.Certificate]],
        *,
        keepalive_interval: float = 10.0,
        keepalive_count_max: int = 3,
        on_change: OnChange | None = None,
        on_refused: OnRefused | None = None,
        authorize: Callable[[Identity], None] | None = None,
        handshake_timeout: float = 15.0,
        dial_timeout: float = 10.0,
    ) -> None:
        self.host_ca_certs = host_ca_certs
        self.keepalive_interval = keepalive_interval
        self.keepalive_count_max = keepalive_count_max
        self.on_change = on_change
        self.on_refused = on_refused
        self.authorize = authorize
        self.handshake_timeout = handshake_timeout
        """How long an authenticated agent has to complete the SSH handshake (half-open guard)."""
        self.dial_timeout = dial_timeout
        self._tunnels: dict[str, TunnelConnection] = {}
        self._all: set[TunnelConnection] = set()
        self._pending: set[TLSConnection] = set()
        self._closing = False
        self._options = asyncssh.SSHClientConnectionOptions(
            username=PROXY_SSH_USER,
            known_hosts=None,
            client_keys=None,
            agent_path=None,
            password=None,
            kbdint_auth=False,
            gss_host=None,
            x509_trusted_certs=None,
            x509_trusted_cert_paths=[],
            encryption_algs=list(ENCRYPTION_ALGS),
            mac_algs=list(MAC_ALGS),
            compression_algs=COMPRESSION_ALGS,
            **asyncssh_keepalive(keepalive_interval, keepalive_count_max),
            connect_timeout=handshake_timeout,
            window=CHANNEL_WINDOW,
            max_pktsize=CHANNEL_MAX_PKTSIZE,
            config=None,
        )

    # -- registry ----------------------------------------------------------------------------

    def connected(self) -> list[str]:
        """Host ids with a live tunnel to this proxy, sorted."""
        return sorted(self._tunnels)

    def get(self, host_id: str) -> TunnelConnection | None:
        return self._tunnels.get(host_id)

    async def dial(
        self, host_id: str, service: str, *, client_addr: str = ""
    ) -> tuple[asyncssh.SSHReader[bytes], asyncssh.SSHWriter[bytes]]:
        """A stream pair to `service` on the agent `host_id`, through its tunnel."""
        tunnel = self._tunnels.get(host_id)
        if tunnel is None or tunnel.closed:
            raise NotFoundError(f"no tunnel from host {host_id} (is its agent running and joined?)")
        return await tunnel.dial(service, client_addr=client_addr, open_timeout=self.dial_timeout)

    async def relay(
        self, conn: TLSConnection, host_id: str, service: str, *, client_addr: str | None = None
    ) -> tuple[int, int]:
        """Relay a routed client connection to `service` on `host_id`; returns bytes each way.

        The client stream stays paused (early bytes held) until the channel is open; if the
        dial fails the error is raised and the client connection is left to the caller.
        """
        if client_addr is None:
            client_addr = format_client_addr(str(conn.remote[0]), int(conn.remote[1])) if conn.remote else ""
        chan_reader, chan_writer = await self.dial(host_id, service, client_addr=client_addr)
        try:
            detached = conn.detach()
        except ConnectionError:
            chan_writer.close()
            raise
        reader, writer = stream_pair(detached.transport, pending=detached.pending, eof=detached.eof)
        return await pipe(reader, writer, chan_reader, chan_writer)

    async def close(self) -> None:
        """Stop accepting tunnels and drop every one (agents reconnect elsewhere or later)."""
        self._closing = True
        for conn in list(self._pending):
            conn.abort()
        tunnels = list(self._all)
        for t in tunnels:
            t.abort()
        for t in tunnels:
            with contextlib.suppress(Exception):
                await t.wait_closed()

    # -- the route handler -------------------------------------------------------------------

    def authenticate(self, peer_cert: bytes | None) -> Identity:
        """The agent identity in a TLS client certificate, or `AuthenticationError` saying why not."""
        if peer_cert is None:
            raise AuthenticationError("no client certificate: agents must present their host certificate")
        identity = verify_tls_identity(peer_cert, self.host_ca_certs())
        if identity.system_role not in AGENT_ROLES:
            what = f"system role {identity.system_role!r}" if identity.system_role else "a user certificate"
            raise AuthenticationError(
                f"certificate of {identity.host_id or identity.user!r} is {what}, "
                f"not an agent ({', '.join(sorted(AGENT_ROLES))})"
            )
        if not identity.host_id:
            raise AuthenticationError(f"agent certificate of {identity.user!r} carries no host id")
        return identity

    async def handle(self, conn: TLSConnection) -> None:
        """The router's handler for `ward-tunnel`: authenticate, speak SSH, hold the tunnel.

        Returns when the tunnel closes; cancelling it (router shutdown) drops the tunnel.
        """
        remote = format_client_addr(str(conn.remote[0]), int(conn.remote[1])) if conn.remote else "unknown"
        if self._closing:
            conn.abort()
            return
        identity: Identity | None = None
        try:
            identity = self.authenticate(conn.peer_cert)
            if self.authorize is not None:
                self.authorize(identity)
        except WardgateError as exc:
            self._refuse(conn, remote, str(exc), identity)
            return
        self._pending.add(conn)
        try:
            ssh = await asyncssh.connect(
                str(conn.remote[0]) if conn.remote else "agent",
                int(conn.remote[1]) if conn.remote else 0,
                tunnel=_Attach(conn),
                options=self._options,
                config=None,
            )
        except (asyncssh.Error, OSError, TimeoutError) as exc:
            why = (
                f"no SSH handshake within {self.handshake_timeout}s" if isinstance(exc, TimeoutError) else exc
            )
            log.info("tunnel from %s (host %s) dropped: %s", remote, identity.host_id, why)
            conn.abort()
            return
        finally:
            self._pending.discard(conn)
        tunnel = TunnelConnection(identity, ssh, remote)
        self._register(tunnel)
        try:
            await ssh.wait_closed()
        finally:
            ssh.abort()
            self._unregister(tunnel)

    def _refuse(self, conn: TLSConnection, remote: str, reason: str, identity: Identity | None) -> None:
        """Log, report, and tell the agent why in an SSH disconnect so its own log says it too."""
        log.warning("refused reverse tunnel from %s: %s", remote, reason)
        if self.on_refused is not None:
            try:
                self.on_refused(remote, reason, identity)
            except Exception:
                log.exception("on_refused callback failed")
        if not conn.closed:
            conn.transport.write(ssh_refusal(reason))
        conn.close()

    def _register(self, tunnel: TunnelConnection) -> None:
        old = self._tunnels.get(tunnel.host_id)
        self._tunnels[tunnel.host_id] = tunnel
        self._all.add(tunnel)
        if tunnel.identity.expires is not None:
            delay = (tunnel.identity.expires - datetime.now(UTC)).total_seconds()
            tunnel._expiry = asyncio.get_running_loop().call_later(max(delay, 0.0), self._expire, tunnel)
        log.info(
            "reverse tunnel up: host %s (%s) from %s%s",
            tunnel.host_id,
            tunnel.system_role,
            tunnel.remote,
            f", replacing the one from {old.remote}" if old is not None else "",
        )
        if old is not None:
            old.closed = True
            old.close()
        self._notify(tunnel.host_id, True)

    def _unregister(self, tunnel: TunnelConnection) -> None:
        tunnel.closed = True
        self._all.discard(tunnel)
        if tunnel._expiry is not None:
            tunnel._expiry.cancel()
            tunnel._expiry = None
        if self._tunnels.get(tunnel.host_id) is tunnel:
            del self._tunnels[tunnel.host_id]
            log.info("reverse tunnel down: host %s from %s", tunnel.host_id, tunnel.remote)
            self._notify(tunnel.host_id, False)

    def _expire(self, tunnel: TunnelConnection) -> None:
        """A tunnel lives no longer than the certificate that opened it; the agent reconnects
        with its renewed one."""
        tunnel._expiry = None
        log.info("reverse tunnel from host %s: certificate expired, disconnecting", tunnel.host_id)
        tunnel.close()

    def _notify(self, host_id: str, up: bool) -> None:
        if self.on_change is not None:
            try:
                self.on_change(host_id, up)
            except Exception:
                log.exception("on_change callback failed")


def ssh_refusal(reason: str) -> bytes:
    """An SSH version line and a cleartext SSH_MSG_DISCONNECT (host not allowed to connect).

    RFC 4253 allows a disconnect before key exchange, in the unencrypted packet format: the
    agent's SSH server reports it as a `DisconnectError` carrying `reason`.
    """
    text = reason.encode("utf-8")[:1024]
    payload = b"\x01" + (1).to_bytes(4, "big") + len(text).to_bytes(4, "big") + text + (0).to_bytes(4, "big")
    padding = 8 - (5 + len(payload)) % 8
    padding += 8 if padding < 4 else 0
    packet = (1 + len(payload) + padding).to_bytes(4, "big") + bytes([padding]) + payload + bytes(padding)
    return b"SSH-2.0-Wardgate\r\n" + packet


# -- streams and the stream relay -----------------------------------------------------------


def stream_pair(
    transport: asyncio.Transport, *, pending: bytes = b"", eof: bool = False, limit: int = DEFAULT_BUFFER_SIZE
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Take over a transport (e.g. `TLSConnection.detach()`'s) as an asyncio stream pair,
    replaying bytes already read from it."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=limit, loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    closing = transport.is_closing()
    transport.set_protocol(protocol)
    protocol.connection_made(transport)
    if pending:
        reader.feed_data(pending)
    if eof:
        reader.feed_eof()
    if closing:
        protocol.connection_lost(None)
    elif not eof:
        transport.resume_reading()
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)


_STREAM_ERRORS: tuple[type[BaseException], ...] = (OSError, asyncssh.Error, asyncio.IncompleteReadError)


async def _copy(src: Any, dst: Any, chunk: int, counts: list[int], i: int) -> None:
    """src → dst until src's EOF, then half-close dst (or close it if it cannot half-close)."""
    while data := await src.read(chunk):
        dst.write(data)
        counts[i] += len(data)
        await dst.drain()
    with contextlib.suppress(*_STREAM_ERRORS):
        if dst.can_write_eof():
            dst.write_eof()
        else:
            dst.close()


def _abort(writer: Any) -> None:
    """Drop a stream now: asyncio writers through their transport, asyncssh ones their channel."""
    with contextlib.suppress(*_STREAM_ERRORS, RuntimeError):
        chan = getattr(writer, "channel", None)
        if chan is not None:
            chan.abort()
        else:
            writer.transport.abort()


async def pipe(
    reader_a: Any,
    writer_a: Any,
    reader_b: Any,
    writer_b: Any,
    *,
    chunk: int = DEFAULT_BUFFER_SIZE,
) -> tuple[int, int]:
    """Relay two stream pairs (asyncio or asyncssh) until both directions end: (a→b, b→a) bytes.

    For streams, where `proxy/relay.py` relays transports. An EOF becomes `write_eof()` on the
    other side (or a close where it cannot half-close, e.g. TLS); an error in either direction
    aborts both; cancelling the caller aborts both. Both writers are closed on return.
    """
    counts = [0, 0]
    tasks = [
        asyncio.ensure_future(_copy(reader_a, writer_b, chunk, counts, 0)),
        asyncio.ensure_future(_copy(reader_b, writer_a, chunk, counts, 1)),
    ]
    failed = False
    try:
        pending: Iterable[asyncio.Future[None]] = tasks
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                exc = t.exception()
                if exc is not None:
                    if not isinstance(exc, _STREAM_ERRORS):
                        raise exc
                    log.debug("pipe ended by %r", exc)
                    failed = True
            if failed:
                break
    except BaseException:
        failed = True
        raise
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for w in (writer_a, writer_b):
            if failed:
                _abort(w)
            else:
                with contextlib.suppress(*_STREAM_ERRORS, RuntimeError):
                    w.close()
    return counts[0], counts[1]
