"""The agent's end of a reverse tunnel: dial out to the proxy and serve the channels it opens.

An agent behind a firewall cannot be dialled, so it dials the proxy's one TLS port with ALPN
`ward-tunnel`, presenting its X.509 host certificate, and keeps that connection up for as long
as it runs. Over the TLS stream the two speak SSH (asyncssh); every client connection the proxy
routes to this agent arrives as one SSH channel, named by the service it wants (`ssh`,
`app:grafana`, `db:pg-main`) and carrying the real client's address.

Roles inside the SSH connection are the reverse of what the names suggest: the **agent runs the
SSH server** (over a connection it dialled, as `asyncssh.connect_reverse` does) and the proxy
the SSH client. A proxy that is the SSH client can open channels with the standard
`direct-tcpip` request, whose destination host carries the service name and whose originator
fields carry the client address, through asyncssh's public API. The other way round (proxy as
server opening `forwarded-tcpip` channels) asyncssh's client only accepts channels whose
destination matches a listener it requested, so the service name could not travel there.

Why no SSH authentication: both ends were already authenticated by TLS. The proxy checked the
agent's host certificate (issued by the cluster's host CA, with an agent system role); the agent
checked the proxy's certificate against the cluster CA and, by default, that it carries the
`proxy` system role. So the agent's SSH server accepts the `none` method, and the proxy does not
check the agent's (ephemeral, per-process) SSH host key. SSH here only multiplexes channels,
with flow control per channel; its cipher is chosen for speed, not for protection.

Reconnection uses exponential back-off with full jitter (`uniform(0, min(max, base * 2**n))`),
so a restarted proxy is not hit by every agent at the same instant.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import ssl
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import asyncssh
from cryptography import x509

from wardgate.api.identityfile import load_key_pair, server_trusting_context
from wardgate.auth.certs import verify_tls_identity
from wardgate.auth.identity import Identity
from wardgate.errors import AuthenticationError, BadParameterError, WardgateError
from wardgate.keys import load_x509_pem_list
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
from wardgate.streams import HeldStream, hand_over

__all__ = [
    "CHANNEL_MAX_PKTSIZE",
    "CHANNEL_WINDOW",
    "COMPRESSION_ALGS",
    "ENCRYPTION_ALGS",
    "MAC_ALGS",
    "TUNNEL_ALPN",
    "ConnectionHandler",
    "TunnelAgent",
    "asyncssh_keepalive",
    "format_client_addr",
    "parse_client_addr",
]

log = logging.getLogger(__name__)

ConnectionHandler = Callable[[str, str, Any, Any], Awaitable[None]]
"""`on_connection(service, client_addr, reader, writer)`: serve one channel; the reader and
writer are asyncssh's `SSHReader`/`SSHWriter` (the asyncio stream API, `write_eof` included).
The channel is closed when the coroutine returns."""


class _TLSDialer:
    """The `tunnel=` object asyncssh dials through: a TLS connection with ALPN `ward-tunnel`,
    checked (ALPN, proxy identity) before SSH starts on it."""

    def __init__(self, agent: TunnelAgent) -> None:
        self.agent = agent

    async def create_connection(
        self, session_factory: Callable[[], asyncio.Protocol], host: str, port: int
    ) -> tuple[asyncio.Transport, asyncio.Protocol]:
        agent = self.agent
        loop = asyncio.get_running_loop()
        hold = HeldStream()
        transport, _ = await loop.create_connection(
            lambda: hold,
            host,
            port,
            ssl=agent._ssl_context(),
            server_hostname=agent.server_name or host,
            ssl_handshake_timeout=agent.connect_timeout,
        )
        try:
            agent._check_proxy(transport)
        except BaseException:
            transport.abort()
            raise
        session = session_factory()
        agent._transport = transport
        hand_over(hold, session)  # type: ignore[arg-type]
        return transport, session  # type: ignore[return-value]


class _AgentSSHServer(asyncssh.SSHServer):
    """The agent's SSH server on its own tunnel: no auth (TLS did it), TCP channels only."""

    def __init__(self, agent: TunnelAgent) -> None:
        self.agent = agent
        self.conn: asyncssh.SSHServerConnection | None = None

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn

    def begin_auth(self, username: str) -> bool:
        return False  # the proxy was authenticated by its TLS certificate

    def connection_requested(
        self, dest_host: str, dest_port: int, orig_host: str, orig_port: int
    ) -> tuple[asyncssh.SSHTCPChannel[bytes], Callable[[Any, Any], Awaitable[None]]]:
        agent = self.agent
        service = dest_host
        if agent.accepts is not None and not agent.accepts(service):
            raise asyncssh.ChannelOpenError(
                asyncssh.OPEN_CONNECT_FAILED, f"this agent does not serve {service!r}"
            )
        assert self.conn is not None
        chan = self.conn.create_tcp_channel(window=CHANNEL_WINDOW, max_pktsize=CHANNEL_MAX_PKTSIZE)
        client_addr = format_client_addr(orig_host, orig_port)

        async def handler(reader: Any, writer: Any) -> None:
            await agent._serve(service, client_addr, reader, writer)

        return chan, handler


class TunnelAgent:
    """Keeps one reverse tunnel to one proxy up, forever, and serves the channels it carries.

    `proxy_addr` is `host:port` of the proxy's TLS port. `cert_pem`/`key_pem` are the agent's
    X.509 host certificate and key, `ca_pems` the cluster CA certificates the proxy's
    certificate must chain to. `on_connection` is called once per channel, in its own task; an
    exception there is logged and closes that channel only. `accepts(service)`, when given,
    refuses channels for services this agent does not serve (the proxy's dial then fails with
    the reason). `proxy_role` is the system role the proxy's certificate must carry (None: any
    certificate the CA signed).
    """

    def __init__(
        self,
        proxy_addr: str,
        *,
        cert_pem: str,
        key_pem: str,
        ca_pems: Sequence[str],
        on_connection: ConnectionHandler,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        keepalive_interval: float = 10.0,
        keepalive_count_max: int = 3,
        connect_timeout: float = 15.0,
        proxy_role: str | None = "proxy",
        server_name: str | None = None,
        accepts: Callable[[str], bool] | None = None,
    ) -> None:
        host, port = parse_client_addr(proxy_addr)
        if not host or not port:
            raise BadParameterError(f"bad proxy address {proxy_addr!r}: expected host:port")
        if backoff_base <= 0 or backoff_max < backoff_base:
            raise BadParameterError("back-off needs 0 < backoff_base <= backoff_max")
        self.proxy_addr = proxy_addr
        self.host, self.port = host, port
        self.on_connection = on_connection
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.keepalive_interval = keepalive_interval
        self.keepalive_count_max = keepalive_count_max
        self.connect_timeout = connect_timeout
        self.proxy_role = proxy_role
        self.server_name = server_name
        self.accepts = accepts
        self.connected = asyncio.Event()
        """Set while a tunnel is up (SSH handshake done), cleared as soon as it drops."""
        self.proxy_identity: Identity | None = None
        self.connects = 0
        """How many times a tunnel came up: a reconnect shows as this growing."""
        self.last_error = ""
        self._cert_pem, self._key_pem, self._ca_pems = cert_pem, key_pem, list(ca_pems)
        self._ctx: ssl.SSLContext | None = None
        self._ca_certs: list[x509.Certificate] = []
        self._host_key = asyncssh.generate_private_key("ssh-ed25519")
        self._conn: asyncssh.SSHServerConnection | None = None
        self._transport: asyncio.Transport | None = None
        self._task: asyncio.Task[None] | None = None
        self._handlers: set[asyncio.Task[Any]] = set()
        self._closing = False
        self._rng = secrets.SystemRandom()
        self.update_credentials(cert_pem, key_pem, ca_pems)

    def __repr__(self) -> str:
        state = "up" if self.connected.is_set() else "down"
        return f"<TunnelAgent to {self.proxy_addr} {state}>"

    def update_credentials(self, cert_pem: str, key_pem: str, ca_pems: Sequence[str]) -> None:
        """New certificate (renewal) or CAs (rotation): used from the next connection on."""
        ctx = server_trusting_context(list(ca_pems))
        load_key_pair(ctx, cert_pem, key_pem)
        ctx.set_alpn_protocols([TUNNEL_ALPN])
        self._ca_certs = [c for pem in ca_pems for c in load_x509_pem_list(pem)]
        self._cert_pem, self._key_pem, self._ca_pems = cert_pem, key_pem, list(ca_pems)
        self._ctx = ctx

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> asyncio.Task[None]:
        """Run the connect/serve/reconnect loop in a task (idempotent)."""
        if self._task is None or self._task.done():
            self._closing = False
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"tunnel:{self.proxy_addr}")
        return self._task

    async def close(self) -> None:
        """Drop the tunnel, stop reconnecting, and cancel the channels being served."""
        self._closing = True
        if self._conn is not None:
            self._conn.abort()
        tasks = [t for t in (self._task, *self._handlers) if t is not None and not t.done()]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.wait_closed()
            self._conn = None
        self.connected.clear()

    def abort_transport(self) -> None:
        """Drop the current tunnel's TCP connection without any goodbye (a crash, as seen from
        the proxy); the loop reconnects. For tests and for operators' `debug` commands."""
        if self._transport is not None:
            self._transport.abort()

    # -- the loop ----------------------------------------------------------------------------

    def next_delay(self, attempt: int) -> float:
        """Full-jitter exponential back-off for the `attempt`-th retry in a row (0-based)."""
        cap = min(self.backoff_max, self.backoff_base * (2 ** min(attempt, 32)))
        return self._rng.uniform(0, cap)

    async def _run(self) -> None:
        attempt = 0
        while not self._closing:
            try:
                conn = await self._connect()
            except asyncio.CancelledError:
                raise
            except (OSError, TimeoutError, asyncssh.Error, ssl.SSLError, WardgateError) as exc:
                self.last_error = _describe_failure(exc)
                log.info("tunnel to %s failed: %s", self.proxy_addr, self.last_error)
            else:
                attempt = 0
                self._conn = conn
                self.connects += 1
                self.connected.set()
                log.info("tunnel to %s up", self.proxy_addr)
                try:
                    await conn.wait_closed()
                finally:
                    self.connected.clear()
                    self._conn = None
                if self._closing:
                    return
                log.info("tunnel to %s closed", self.proxy_addr)
            delay = self.next_delay(attempt)
            attempt += 1
            log.info("reconnecting to %s in %.2fs (attempt %d)", self.proxy_addr, delay, attempt)
            await asyncio.sleep(delay)

    async def _connect(self) -> asyncssh.SSHServerConnection:
        return await asyncssh.connect_reverse(
            self.host,
            self.port,
            tunnel=_TLSDialer(self),
            server_factory=lambda: _AgentSSHServer(self),
            server_host_keys=[self._host_key],
            encryption_algs=list(ENCRYPTION_ALGS),
            mac_algs=list(MAC_ALGS),
            compression_algs=COMPRESSION_ALGS,
            **asyncssh_keepalive(self.keepalive_interval, self.keepalive_count_max),
            connect_timeout=self.connect_timeout,
            login_timeout=self.connect_timeout,
            window=CHANNEL_WINDOW,
            max_pktsize=CHANNEL_MAX_PKTSIZE,
            allow_pty=False,
            agent_forwarding=False,
            x11_forwarding=False,
            rdns_lookup=False,
            config=None,
        )

    def _ssl_context(self) -> ssl.SSLContext:
        assert self._ctx is not None
        return self._ctx

    def _check_proxy(self, transport: asyncio.BaseTransport) -> None:
        """The proxy answered the right protocol and is a proxy (TLS already checked the CA)."""
        ssl_obj = transport.get_extra_info("ssl_object")
        alpn = ssl_obj.selected_alpn_protocol() if ssl_obj is not None else None
        if alpn != TUNNEL_ALPN:
            raise AuthenticationError(
                f"{self.proxy_addr} did not accept ALPN {TUNNEL_ALPN!r} (got {alpn!r}): "
                "is it a Wardgate proxy with reverse tunnels enabled?"
            )
        der = ssl_obj.getpeercert(binary_form=True)
        if self.proxy_role is None:
            return
        if der is None:
            raise AuthenticationError(f"{self.proxy_addr} presented no certificate")
        identity = verify_tls_identity(der, self._ca_certs)
        if identity.system_role != self.proxy_role:
            raise AuthenticationError(
                f"{self.proxy_addr} is not a Wardgate proxy: its certificate is for "
                f"{identity.host_id or identity.user!r} with system role {identity.system_role or 'none'!r}"
            )
        self.proxy_identity = identity

    async def _serve(self, service: str, client_addr: str, reader: Any, writer: Any) -> None:
        """Run `on_connection` for one channel; its failure ends this channel, not the tunnel."""
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        try:
            await self.on_connection(service, client_addr, reader, writer)
        except asyncio.CancelledError:
            writer.channel.abort()
            raise
        except Exception:
            log.exception("tunnel channel for %r from %s failed", service, client_addr or "unknown client")
            writer.channel.abort()
        finally:
            if task is not None:
                self._handlers.discard(task)
            writer.close()


def _describe_failure(exc: BaseException) -> str:
    """Why a tunnel could not be set up, in words an operator can act on."""
    if isinstance(exc, asyncssh.DisconnectError):
        if exc.code == asyncssh.DISC_HOST_NOT_ALLOWED_TO_CONNECT:
            # asyncssh appends " (error 1)" to disconnect codes it has no class for.
            return f"the proxy refused this agent: {exc.reason.removesuffix(f' (error {exc.code})')}"
        if isinstance(exc, asyncssh.ConnectionLost):
            # TLS alerts do not reach us through the event loop's SSL transport: say what it means.
            return (
                "the proxy closed the connection before the SSH handshake (was this agent's "
                "certificate refused: another cluster's CA, or expired? see the proxy's log)"
            )
        return f"SSH: {exc.reason}"
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__


def tunnel_for(
    proxy_addr: str, identity: Any, on_connection: ConnectionHandler, service: str
) -> TunnelAgent:
    """A started tunnel from an agent with `identity` (an IdentityFile) serving one `service`."""
    tunnel = TunnelAgent(
        proxy_addr,
        cert_pem=identity.cert_pem,
        key_pem=identity.key_pem,
        ca_pems=identity.ca_pems,
        on_connection=on_connection,
        accepts=lambda asked: asked == service,
    )
    tunnel.start()
    return tunnel
