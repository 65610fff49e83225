"""The one TLS listener: every protocol Wardgate proxies arrives on one port and is routed by ALPN.

How a connection travels through here:

1. Accept (batched, non-blocking) and *peek* at the first bytes with `MSG_PEEK`, parsing them
   with the sans-IO ClientHello reader. Nothing is consumed, so the TLS stack later reads the
   ClientHello from the kernel as if we had never looked. While the ClientHello is incomplete the
   socket's `SO_RCVLOWAT` is set to the byte count still needed, so a slow or fragmented client
   wakes us once, not per byte. Plain HTTP gets a `400` telling the user to use https://;
   garbage, an oversized hello, or a client that misses the handshake deadline is closed. None of
   this blocks or delays other connections.
2. Hand the socket to the event loop's native TLS (`loop.connect_accepted_socket(ssl=…)`: on
   uvloop the whole data plane stays in C) with the rest of the handshake deadline. The context
   requests a client certificate (CERT_OPTIONAL, trusting the configured CAs).
3. Route by negotiated ALPN (`ward-ssh`, `ward-tunnel`, …), then by SNI (a prefix such as
   `kube.`, or any predicate: an app's public host name), then to the default (web) handler.
   `X-ping` wraps the stream in the ping framing and sends empty keep-alive frames every
   `ping_interval` seconds.
4. The handler gets a `TLSConnection`: until it takes the stream (`attach` a protocol, `relay_to`
   a target, or `detach` for its own relay), the stream is paused and early bytes are held.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import inspect
import logging
import select
import socket
import ssl
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from wardgate.api.identityfile import load_key_pair
from wardgate.protocols.errors import ProtocolError
from wardgate.protocols.ping import KEEPALIVE, PingDecoder, encode
from wardgate.protocols.tls import MAX_CLIENT_HELLO, ClientHello, NeedMore, parse_client_hello
from wardgate.proxy.relay import DEFAULT_BUFFER_SIZE, Relay, RelayStats, Tap, dial_and_relay
from wardgate.streams import HeldStream, deliver, hand_over

log = logging.getLogger(__name__)

PING_SUFFIX = "-ping"
DEFAULT_HANDSHAKE_TIMEOUT = 15.0
DEFAULT_PING_INTERVAL = 30.0
WEB_ALPNS: tuple[str, ...] = ("http/1.1",)
"""ALPNs the default (web) handler answers to. Not `h2`: aiohttp speaks HTTP/1.1 only, and a
browser offered `h2` would then speak HTTP/2 at it."""

_ACCEPTS_PER_WAKEUP = 64
_SPURIOUS_WAKE_BACKOFF = 0.05
_PLAIN_HTTP_BODY = b"This port speaks TLS. Client sent an HTTP request to an HTTPS server: use https://\n"
_PLAIN_HTTP_REPLY = (
    b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\n"
    b"Content-Length: " + str(len(_PLAIN_HTTP_BODY)).encode() + b"\r\n\r\n" + _PLAIN_HTTP_BODY
)

Handler = Callable[["TLSConnection"], Awaitable[None] | None]
"""Called once per routed connection. It must take the stream (`attach`, `relay_to`, `detach`)
or close it; a stream still untaken when the handler returns is closed for it."""
SNIMatcher = Callable[[str], bool]
"""Says whether a (lower-cased) SNI host name belongs to a route; called once per connection
that no ALPN route took, so it must be cheap and must not block."""


def server_context(
    cert_pem: str, key_pem: str, *, client_ca_pems: Sequence[str] = (), min_version: str = "TLSv1.2"
) -> ssl.SSLContext:
    """A server context for the router: our certificate, and client certificates requested (not
    required) and verified against `client_ca_pems` when given."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion[min_version.replace(".", "_")]
    load_key_pair(ctx, cert_pem, key_pem)
    if client_ca_pems:
        ctx.load_verify_locations(cadata="".join(client_ca_pems))
        ctx.verify_mode = ssl.CERT_OPTIONAL
    else:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


# -- holding a connection until its handler takes it ------------------------------------------


# -- the -ping variant ------------------------------------------------------------------------


class PingTransport(asyncio.Transport):
    """A stream inside the ping framing: writes become frames, read frames become bytes again,
    and an empty frame goes out every `interval` seconds so idle-killing balancers see traffic.

    Works over any transport (the router uses it on the TLS one); `get_extra_info` passes through.
    Unframed bytes wait here while the protocol has reading paused, as a transport's should.
    """

    def __init__(
        self, transport: asyncio.Transport, *, interval: float | None = DEFAULT_PING_INTERVAL
    ) -> None:
        super().__init__()
        self._loop = asyncio.get_running_loop()
        self._t: Any = transport
        self._protocol: asyncio.BaseProtocol = asyncio.Protocol()
        self._decoder = PingDecoder()
        self._interval = interval
        self._timer: asyncio.TimerHandle | None = None
        self._pending: deque[bytes] = deque()
        self._paused = False
        self._eof = False  # the outer stream ended; told to the protocol once pending bytes are in
        self._flush_handle: asyncio.Handle | None = None
        self._adapter = _PingAdapter(self)
        transport.set_protocol(self._adapter)
        if interval is not None:
            self._timer = self._loop.call_later(interval, self._keepalive)

    @property
    def keepalives_received(self) -> int:
        return self._decoder.keepalives

    def _keepalive(self) -> None:
        self._timer = None
        if self._t.is_closing():
            return
        self._t.write(KEEPALIVE)
        assert self._interval is not None
        self._timer = self._loop.call_later(self._interval, self._keepalive)

    def _stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _received(self, data: bytes) -> None:
        try:
            pieces = self._decoder.feed(data)
        except ProtocolError as exc:
            log.debug("closing ping stream: %s", exc)
            self.abort()
            return
        self._pending.extend(pieces)
        self._flush()

    def _flush(self) -> None:
        self._flush_handle = None
        while self._pending and not self._paused:
            rest = deliver(self._protocol, self._pending.popleft(), lambda: self._paused)
            if rest:
                self._pending.appendleft(rest)
        if self._eof and not self._pending and not self._paused:
            self._eof = False
            self._protocol.eof_received()  # type: ignore[attr-defined]

    # BaseTransport
    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ping":
            return True
        return self._t.get_extra_info(name, default)

    def is_closing(self) -> bool:
        return bool(self._t.is_closing())

    def close(self) -> None:
        self._stop()
        self._t.close()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    # ReadTransport
    def is_reading(self) -> bool:
        return not self._paused

    def pause_reading(self) -> None:
        self._paused = True
        self._t.pause_reading()

    def resume_reading(self) -> None:
        if not self._paused:
            return
        self._paused = False
        self._t.resume_reading()
        if (self._pending or self._eof) and self._flush_handle is None:
            self._flush_handle = self._loop.call_soon(self._flush)

    # WriteTransport
    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._t.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return int(self._t.get_write_buffer_size())

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._t.get_write_buffer_limits()  # type: ignore[no-any-return]

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if data:
            self._t.writelines(encode(data))

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        for data in list_of_data:
            self.write(data)

    def write_eof(self) -> None:
        raise NotImplementedError("a framed TLS stream cannot half-close")

    def can_write_eof(self) -> bool:
        return False

    def abort(self) -> None:
        self._stop()
        self._pending.clear()
        self._t.abort()


class _PingAdapter(asyncio.Protocol):
    """The protocol on the outer transport: hands its bytes and events to the PingTransport."""

    def __init__(self, pt: PingTransport) -> None:
        self.pt = pt

    def data_received(self, data: bytes) -> None:
        self.pt._received(data)

    def eof_received(self) -> bool:
        pt = self.pt
        if pt._decoder.in_frame:
            log.debug("ping stream ended inside a frame")
        pt._eof = True
        pt._flush()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        pt = self.pt
        pt._stop()
        if pt._flush_handle is not None:
            pt._flush_handle.cancel()
        pt._flush()  # what can still be given is given; a paused protocol's rest is dropped
        pt._pending.clear()
        pt._protocol.connection_lost(exc)

    def pause_writing(self) -> None:
        self.pt._protocol.pause_writing()

    def resume_writing(self) -> None:
        self.pt._protocol.resume_writing()


# -- what a handler gets ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Detached:
    """A stream taken out of the router: feed `pending` first; `eof` means the client already
    finished sending."""

    transport: asyncio.Transport
    pending: bytes
    eof: bool


class TLSConnection:
    """A TLS-terminated, routed connection, handed to a route's handler.

    `alpn` is the route's protocol (`ward-ssh` also for `ward-ssh-ping`; None when none was
    negotiated), `ping` whether the stream is inside the ping framing (the `transport` here
    already un/frames), `peer_cert` the client certificate in DER when one was presented (it was
    verified against the router's client CAs; identity and locks are the handler's to check).
    """

    def __init__(
        self,
        *,
        hold: HeldStream,
        route: str,
        alpn: str | None,
        negotiated_alpn: str | None,
        ping: bool,
        client_hello: ClientHello,
        peer_cert: bytes | None,
        tls_version: str | None,
        remote: tuple[Any, ...],
        local: tuple[Any, ...],
    ) -> None:
        self._hold = hold
        self.route = route
        self.alpn = alpn
        self.negotiated_alpn = negotiated_alpn
        self.ping = ping
        self.client_hello = client_hello
        self.sni = client_hello.sni
        self.peer_cert = peer_cert
        self.tls_version = tls_version
        self.remote = remote
        self.local = local
        self.taken = False

    def __repr__(self) -> str:
        return f"<TLSConnection {self.remote[0]}:{self.remote[1]} route={self.route} sni={self.sni}>"

    @property
    def transport(self) -> asyncio.Transport:
        return self._hold.transport  # type: ignore[no-any-return]

    @property
    def closed(self) -> bool:
        return self._hold.lost or bool(self._hold.transport.is_closing())

    def _take(self) -> None:
        if self.taken:
            raise RuntimeError("connection already taken by its handler")
        self.taken = True

    def attach(self, protocol: asyncio.BaseProtocol) -> None:
        """Give the stream to an asyncio protocol (plain or buffered), e.g. `web.Server()()`
        for aiohttp. Bytes that arrived early are replayed to it first."""
        self._take()
        hand_over(self._hold, protocol)

    def detach(self) -> Detached:
        """Take the raw stream for your own relay; raises if the client already went away."""
        self._take()
        if self._hold.lost:
            raise ConnectionResetError(f"client {self.remote[0]} closed the connection before it was routed")
        return Detached(self._hold.transport, self._hold.take_data(), self._hold.eof)

    async def relay_to(
        self,
        host: str,
        port: int,
        *,
        dial_timeout: float | None = 10.0,
        buffer_size: int = DEFAULT_BUFFER_SIZE,
        tap: Tap | None = None,
        idle_timeout: float | None = None,
        **create_connection_kwargs: Any,
    ) -> RelayStats:
        """Dial host:port and relay this stream to it until both ends close (see `dial_and_relay`)."""
        d = self.detach()
        return await dial_and_relay(
            d.transport,
            host,
            port,
            pending=d.pending,
            eof=d.eof,
            dial_timeout=dial_timeout,
            buffer_size=buffer_size,
            tap=tap,
            idle_timeout=idle_timeout,
            **create_connection_kwargs,
        )

    def close(self) -> None:
        """Close gracefully (TLS close_notify after flushing)."""
        self.taken = True
        if not self._hold.lost:
            self._hold.transport.close()

    def abort(self) -> None:
        self.taken = True
        if not self._hold.lost:
            self._hold.transport.abort()


# -- the router -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Route:
    name: str
    handler: Handler
    ping: bool


class TLSRouter:
    """The proxy's one TLS port, routing each connection to a handler by ALPN, then SNI.

    Routes form an open table: `add_route("ward-ssh", h)` also serves `ward-ssh-ping`;
    `add_sni_route("kube.", h)`, or `add_sni_matcher("app", is_app_host, h)` for names a
    predicate recognises (tried in the order added); `set_default(web_handler)` for HTTP and for clients that
    negotiate nothing we know. The server context's ALPN list is kept in step with the table
    (the router sets it on the context it is given). `stats` counts what happened to each
    connection: `accepted`, `rejected_<kind>`, `closed_before_hello`, `handshake_timeout`,
    `handshake_failed`, `routed`, `route:<name>`, `no_route`, `handler_error`,
    `sni_matcher_error`.
    """

    def __init__(
        self,
        ssl_context: ssl.SSLContext,
        *,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        ping_interval: float | None = DEFAULT_PING_INTERVAL,
    ) -> None:
        if handshake_timeout <= 0:
            raise ValueError("handshake_timeout must be positive")
        self.handshake_timeout = handshake_timeout
        self.ping_interval = ping_interval
        self.stats: Counter[str] = Counter()
        self._routes: dict[str, _Route] = {}
        self._sni_routes: list[tuple[SNIMatcher, _Route]] = []
        self._passthrough: dict[str, tuple[str, int]] = {}
        self._default: _Route | None = None
        self._web_alpns: tuple[str, ...] = ()
        self._ctx = ssl_context
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sniffers: set[_Sniffer] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._in_handshake = 0
        self._refresh_alpn()

    # -- configuration -----------------------------------------------------------------------

    @property
    def ssl_context(self) -> ssl.SSLContext:
        return self._ctx

    @ssl_context.setter
    def ssl_context(self, ctx: ssl.SSLContext) -> None:
        """Swap certificates or client CAs; applies to connections accepted from now on."""
        self._ctx = ctx
        self._refresh_alpn()

    def add_route(self, alpn: str, handler: Handler, *, ping: bool = True) -> None:
        """Route connections negotiating `alpn` (and `alpn-ping` unless ping=False)."""
        if not alpn or len(alpn.encode()) > 255 - len(PING_SUFFIX) or alpn.endswith(PING_SUFFIX):
            raise ValueError(f"bad ALPN protocol name {alpn!r}")
        self._routes[alpn] = _Route(alpn, handler, ping)
        self._refresh_alpn()

    def add_passthrough(self, alpn: str, host: str, port: int) -> None:
        """Relay connections offering `alpn` to host:port *without* terminating TLS, so the
        target sees the client's own handshake and certificate (the auth API's mutual TLS)."""
        self._passthrough[alpn] = (host, port)

    def add_sni_route(self, prefix: str, handler: Handler) -> None:
        """Route by SNI prefix (e.g. `kube.`) when the ALPN names no route of its own."""
        prefix = prefix.lower()
        self.add_sni_matcher(prefix, lambda name: name.startswith(prefix), handler)

    def add_sni_matcher(self, name: str, matcher: SNIMatcher, handler: Handler) -> None:
        """Route connections whose SNI `matcher` accepts, when the ALPN names no route of its own
        (so `ward-*` protocols keep their handlers whatever name the client asked for) and before
        the default: how a web request for an app's host name reaches the app proxy, not the UI.
        The matcher sees the SNI lower-cased; a matcher that raises counts as no match."""
        if not name or any(r.name == f"sni:{name}" for _, r in self._sni_routes):
            raise ValueError(f"bad or duplicate SNI route name {name!r}")
        self._sni_routes.append((matcher, _Route(f"sni:{name}", handler, False)))

    def set_default(self, handler: Handler, *, alpns: Sequence[str] = WEB_ALPNS) -> None:
        """The web handler: gets `alpns` (advertised), no ALPN, and ALPNs we do not know."""
        self._default = _Route("default", handler, False)
        self._web_alpns = tuple(alpns)
        self._refresh_alpn()

    def advertised_alpns(self) -> list[str]:
        """Server preference order: ping variants first (a client offering one wants it)."""
        pings = [r.name + PING_SUFFIX for r in self._routes.values() if r.ping]
        return pings + list(self._routes) + [a for a in self._web_alpns if a not in self._routes]

    def _refresh_alpn(self) -> None:
        alpns = self.advertised_alpns()
        if alpns:
            self._ctx.set_alpn_protocols(alpns)

    def _resolve(self, negotiated: str | None, sni: str | None) -> tuple[_Route | None, str | None, bool]:
        alpn, ping = negotiated, False
        if alpn is not None and alpn.endswith(PING_SUFFIX):
            base = self._routes.get(alpn[: -len(PING_SUFFIX)])
            if base is not None and base.ping:
                alpn, ping = base.name, True
        if alpn is not None and alpn in self._routes:
            return self._routes[alpn], alpn, ping
        if sni:
            name = sni.lower()
            for matcher, route in self._sni_routes:
                try:
                    hit = matcher(name)
                except Exception:
                    self.stats["sni_matcher_error"] += 1
                    log.exception("SNI matcher of route %s failed for %r", route.name, name)
                    continue
                if hit:
                    return route, alpn, False
        return self._default, alpn, False

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        sock: socket.socket | None = None,
        backlog: int = 1024,
        reuse_port: bool = False,
    ) -> tuple[str, int]:
        """Listen on host:port (or an already-bound `sock`); returns the bound address."""
        if self._sock is not None:
            raise RuntimeError("router already started")
        self._loop = asyncio.get_running_loop()
        if sock is None:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.create_server((host, port), family=family, backlog=backlog, reuse_port=reuse_port)
        sock.setblocking(False)
        self._sock = sock
        self._loop.add_reader(sock.fileno(), self._on_accept)
        return self.address

    @property
    def address(self) -> tuple[str, int]:
        if self._sock is None:
            raise RuntimeError("router not started")
        name = self._sock.getsockname()
        return name[0], name[1]

    @property
    def pending_handshakes(self) -> int:
        """Connections accepted but not yet routed (peeking or in the TLS handshake)."""
        return len(self._sniffers) + self._in_handshake

    async def close(self) -> None:
        """Stop listening; drop connections not yet routed; cancel running handlers (which
        aborts their relays). Streams a handler attached elsewhere belong to that owner."""
        loop = self._loop
        if self._sock is not None and loop is not None and self._sock.fileno() != -1:
            loop.remove_reader(self._sock.fileno())
            self._sock.close()
        for sniffer in list(self._sniffers):
            sniffer.drop()
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    # -- accepting and peeking ---------------------------------------------------------------

    def _on_accept(self) -> None:
        assert self._sock is not None and self._loop is not None
        for _ in range(_ACCEPTS_PER_WAKEUP):
            try:
                conn, addr = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno == errno.ECONNABORTED:
                    continue
                # Out of descriptors or memory: back off instead of spinning on a ready socket.
                log.warning("accept failed (%s); pausing accepts for 1s", exc)
                self.stats["accept_error"] += 1
                fd = self._sock.fileno()
                self._loop.remove_reader(fd)
                self._loop.call_later(1.0, self._resume_accept, fd)
                return
            self.stats["accepted"] += 1
            conn.setblocking(False)
            with contextlib.suppress(OSError):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sniffer = _Sniffer(self, conn, addr)
            self._sniffers.add(sniffer)
            sniffer.peek()

    def _resume_accept(self, fd: int) -> None:
        if self._sock is not None and self._sock.fileno() == fd and self._loop is not None:
            self._loop.add_reader(fd, self._on_accept)

    def _hello_received(
        self, sock: socket.socket, addr: tuple[Any, ...], hello: ClientHello, deadline: float
    ) -> None:
        assert self._loop is not None
        task = self._loop.create_task(self._handshake(sock, addr, hello, deadline))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- TLS and routing ---------------------------------------------------------------------

    async def _handshake(
        self, sock: socket.socket, addr: tuple[Any, ...], hello: ClientHello, deadline: float
    ) -> None:
        loop = asyncio.get_running_loop()
        passthrough = next((a for a in hello.alpn if a in self._passthrough), None)
        if passthrough is not None:
            await self._pass_through(sock, addr, passthrough)
            return
        hold = HeldStream()
        remaining = deadline - loop.time()
        if remaining <= 0:
            self.stats["handshake_timeout"] += 1
            sock.close()
            return
        self._in_handshake += 1
        try:
            transport, _ = await loop.connect_accepted_socket(
                lambda: hold, sock, ssl=self._ctx, ssl_handshake_timeout=remaining
            )
        except (OSError, TimeoutError) as exc:
            late = loop.time() >= deadline - 0.01
            self.stats["handshake_timeout" if late else "handshake_failed"] += 1
            log.debug("%s: TLS handshake %s: %s", addr[0], "timed out" if late else "failed", exc)
            return
        finally:
            self._in_handshake -= 1
        ssl_obj: ssl.SSLObject = transport.get_extra_info("ssl_object")
        negotiated = ssl_obj.selected_alpn_protocol()
        route, alpn, ping = self._resolve(negotiated, hello.sni)
        if route is None:
            self.stats["no_route"] += 1
            log.debug("%s: no route for ALPN %r SNI %r", addr[0], negotiated, hello.sni)
            transport.close()
            return
        if ping:
            hold = self._wrap_ping(hold)
        conn = TLSConnection(
            hold=hold,
            route=route.name,
            alpn=alpn,
            negotiated_alpn=negotiated,
            ping=ping,
            client_hello=hello,
            peer_cert=ssl_obj.getpeercert(binary_form=True),
            tls_version=ssl_obj.version(),
            remote=tuple(addr),
            local=tuple(transport.get_extra_info("sockname") or ()),
        )
        self.stats["routed"] += 1
        self.stats[f"route:{route.name}"] += 1
        try:
            result = route.handler(conn)
            if inspect.isawaitable(result):
                await result
        except asyncio.CancelledError:
            conn.abort()
            raise
        except Exception:
            self.stats["handler_error"] += 1
            log.exception("%s handler failed for %s", route.name, conn)
            conn.abort()
            return
        if not conn.taken:
            log.debug("%s handler returned without taking %s: closing it", route.name, conn)
            conn.close()

    async def _pass_through(self, sock: socket.socket, addr: tuple[Any, ...], alpn: str) -> None:
        host, port = self._passthrough[alpn]
        self.stats["routed"] += 1
        self.stats[f"route:{alpn}"] += 1
        relay = Relay()
        loop = asyncio.get_running_loop()
        try:
            await loop.connect_accepted_socket(relay.protocol_a, sock)
            await relay.dial_b(host, port, dial_timeout=10.0)
        except (OSError, TimeoutError) as exc:
            relay.abort()
            log.warning("%s: passthrough %s to %s:%d failed: %s", addr[0], alpn, host, port, exc)
            return
        try:
            await relay.run()
        except asyncio.CancelledError:
            relay.abort()
            raise

    def _wrap_ping(self, hold: HeldStream) -> HeldStream:
        """Put the ping framing between the TLS stream and a fresh hold, replaying early bytes."""
        pt = PingTransport(hold.transport, interval=self.ping_interval)
        inner = HeldStream()
        pt.set_protocol(inner)
        inner.connection_made(pt)
        data = hold.take_data()
        if data:
            pt._received(data)
        if hold.eof:
            pt._adapter.eof_received()
        if hold.lost:
            pt._adapter.connection_lost(hold.exc)
        return inner


class _Sniffer:
    """Peeks at one accepted socket until its ClientHello is complete, or rejects it."""

    __slots__ = ("addr", "deadline", "loop", "lowat", "reading", "router", "sock", "timer")

    def __init__(self, router: TLSRouter, sock: socket.socket, addr: tuple[Any, ...]) -> None:
        assert router._loop is not None
        self.router = router
        self.loop = router._loop
        self.sock = sock
        self.addr = addr
        self.deadline = self.loop.time() + router.handshake_timeout
        self.timer: asyncio.TimerHandle | None = self.loop.call_at(self.deadline, self.timed_out)
        self.lowat = 1
        self.reading = False

    def peek(self) -> None:
        try:
            data = self.sock.recv(MAX_CLIENT_HELLO, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            self.wait_readable()
            return
        except OSError as exc:
            self.finish("closed_before_hello", f"error before ClientHello: {exc}")
            return
        if not data:
            self.finish("closed_before_hello", "closed before sending a ClientHello")
            return
        try:
            result = parse_client_hello(data)
        except ProtocolError as exc:
            self.reject(exc)
            return
        if isinstance(result, NeedMore):
            self.need_more(len(data), result.needed)
            return
        self.stop_watching()
        if self.lowat != 1:
            with contextlib.suppress(OSError):
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
        self.router._sniffers.discard(self)
        self.router._hello_received(self.sock, self.addr, result, self.deadline)

    def need_more(self, have: int, needed: int) -> None:
        if have < self.lowat:
            # Woken with fewer bytes than asked for: the peer closed, or the kernel woke us early.
            if self.peer_closed():
                self.finish("closed_before_hello", f"closed after {have} bytes of a ClientHello")
                return
            self.stop_watching()
            self.loop.call_later(_SPURIOUS_WAKE_BACKOFF, self.retry)
            return
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, needed)
            self.lowat = needed
        except OSError:
            # Without SO_RCVLOWAT, poll instead of waking on every byte.
            self.stop_watching()
            self.loop.call_later(_SPURIOUS_WAKE_BACKOFF, self.retry)
            return
        self.wait_readable()

    def retry(self) -> None:
        if self in self.router._sniffers:
            self.peek()

    def peer_closed(self) -> bool:
        """Did the client shut its side? (Data still queued hides the EOF from a peek.)"""
        rdhup = getattr(select, "POLLRDHUP", 0x2000)
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN | rdhup)
        closed = rdhup | select.POLLHUP | select.POLLERR
        return any(events & closed for _, events in poller.poll(0))

    def wait_readable(self) -> None:
        if not self.reading:
            self.loop.add_reader(self.sock.fileno(), self.peek)
            self.reading = True

    def stop_watching(self) -> None:
        if self.reading:
            self.loop.remove_reader(self.sock.fileno())
            self.reading = False
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def timed_out(self) -> None:
        self.timer = None
        self.finish("handshake_timeout", f"no complete ClientHello within {self.router.handshake_timeout}s")

    def reject(self, exc: ProtocolError) -> None:
        reply = _PLAIN_HTTP_REPLY if exc.kind == "plain_http" else b""
        self.finish(f"rejected_{exc.kind}", str(exc), reply)

    def finish(self, stat: str, why: str, reply: bytes = b"") -> None:
        self.router.stats[stat] += 1
        log.debug("%s:%s: %s", self.addr[0], self.addr[1], why)
        self.drop(reply)

    def drop(self, reply: bytes = b"") -> None:
        """Close without a reset where we can: read what the client sent, answer, then close."""
        self.stop_watching()
        self.router._sniffers.discard(self)
        with contextlib.suppress(OSError):
            for _ in range(16):
                if not self.sock.recv(65536):
                    break
        if reply:
            with contextlib.suppress(OSError):
                self.sock.send(reply)
        self.sock.close()
