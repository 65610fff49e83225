"""TLS client streams that can half-close.

asyncio's and uvloop's SSL transports cannot send TLS close_notify while still reading
(`can_write_eof()` is False), so a ProxyCommand built on them cannot tell the far end "no more
input" and then wait for the rest of the output. This module runs TLS over a plain TCP transport
with `ssl.SSLObject` and memory BIOs: `write_eof()` sends close_notify (and a TCP FIN) and keeps
decrypting what arrives until the peer closes. The result is exposed as ordinary
`asyncio.StreamReader`/`StreamWriter`, so callers use the stream API they know.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from typing import Any

READ_SIZE = 256 * 1024


class _AppTransport(asyncio.Transport):
    """What the stream protocol sees: writes are encrypted, reads arrive decrypted."""

    def __init__(self, conn: _TLSConnection) -> None:
        super().__init__()
        self._conn = conn

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._conn.extra_info(name, default)

    def is_closing(self) -> bool:
        return self._conn.closing

    def close(self) -> None:
        self._conn.close()

    def abort(self) -> None:
        self._conn.abort()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._conn.write(data)

    def write_eof(self) -> None:
        self._conn.write_eof()

    def can_write_eof(self) -> bool:
        return True

    def pause_reading(self) -> None:
        self._conn.pause_reading()

    def resume_reading(self) -> None:
        self._conn.resume_reading()

    def is_reading(self) -> bool:
        return not self._conn.reading_paused

    def get_write_buffer_size(self) -> int:
        return self._conn.write_buffer_size()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._conn.set_write_buffer_limits(high, low)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._conn.app = protocol  # type: ignore[assignment]

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._conn.app  # type: ignore[return-value]


class _TLSConnection(asyncio.Protocol):
    """The TCP side: feeds the SSLObject, flushes what it produces, forwards flow control."""

    def __init__(
        self, ctx: ssl.SSLContext, server_hostname: str | None, handshake: asyncio.Future[None]
    ) -> None:
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._obj = ctx.wrap_bio(self._in, self._out, server_side=False, server_hostname=server_hostname)
        self._handshake = handshake
        self._tcp: asyncio.Transport | None = None
        self.app: asyncio.Protocol | None = None
        self.transport = _AppTransport(self)
        self.closing = False
        self.reading_paused = False
        self._eof_sent = False
        self._eof_delivered = False
        self._error: BaseException | None = None
        self._lost = False

    # ---- TCP protocol side

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._tcp = transport  # type: ignore[assignment]  # uvloop's transports don't subclass asyncio's
        self._do_handshake()

    def data_received(self, data: bytes) -> None:
        self._in.write(data)
        if not self._handshake.done():
            self._do_handshake()
        else:
            self._pump()

    def eof_received(self) -> bool:
        self._in.write_eof()
        if not self._handshake.done():
            self._do_handshake()
            return False
        self._pump()
        return True  # a FIN after close_notify still lets us finish writing

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self.closing = True
        if not self._handshake.done():
            self._handshake.set_exception(
                exc or ConnectionResetError("the connection closed during the TLS handshake")
            )
            return
        if self.app is not None:
            self.app.connection_lost(self._error or exc)  # type: ignore[arg-type]

    def pause_writing(self) -> None:
        if self.app is not None:
            self.app.pause_writing()

    def resume_writing(self) -> None:
        if self.app is not None:
            self.app.resume_writing()

    # ---- TLS machinery

    def _flush(self) -> None:
        if self._out.pending and self._tcp is not None and not self._tcp.is_closing():
            self._tcp.write(self._out.read())

    def _do_handshake(self) -> None:
        try:
            self._obj.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except (ssl.SSLError, ssl.CertificateError) as exc:
            self._flush()
            if not self._handshake.done():
                self._handshake.set_exception(exc)
            if self._tcp is not None:
                self._tcp.close()
            return
        self._flush()
        if not self._handshake.done():
            self._handshake.set_result(None)

    def start(self, app: asyncio.Protocol) -> None:
        """Attach the stream protocol and deliver anything that arrived right after the handshake."""
        self.app = app
        app.connection_made(self.transport)
        self._pump()

    def _pump(self) -> None:
        if self.app is None or self.reading_paused or self._eof_delivered:
            return
        chunks: list[bytes] = []
        eof = False
        error: BaseException | None = None
        try:
            while True:
                chunk = self._obj.read(READ_SIZE)
                if not chunk:
                    eof = True
                    break
                chunks.append(chunk)
        except ssl.SSLWantReadError:
            pass
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            eof = True  # close_notify, or a FIN without it (SSH's own MACs catch truncation)
        except ssl.SSLError as exc:
            error = exc
        self._flush()  # reading may answer key updates
        if chunks:
            self.app.data_received(b"".join(chunks))
        if error is not None:
            self._fatal(error)
        elif eof:
            self._eof_delivered = True
            keep_open = self.app.eof_received()
            if self._eof_sent or not keep_open:
                self.close()

    def _fatal(self, exc: BaseException) -> None:
        self._error = exc
        self.closing = True
        if self._tcp is not None:
            self._tcp.abort()

    # ---- app transport side

    def extra_info(self, name: str, default: Any) -> Any:
        if name == "ssl_object":
            return self._obj
        if name == "peercert":
            return self._obj.getpeercert()
        if name == "cipher":
            return self._obj.cipher()
        if name == "selected_alpn":
            return self._obj.selected_alpn_protocol()
        # Never "sslcontext": StreamReaderProtocol would then refuse to stay half-open.
        return self._tcp.get_extra_info(name, default) if self._tcp is not None else default

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._eof_sent:
            raise RuntimeError("cannot write after write_eof()")
        if self.closing or not data:
            return
        try:
            self._obj.write(data)
        except ssl.SSLError as exc:
            self._fatal(exc)
            return
        self._flush()

    def write_eof(self) -> None:
        """Send close_notify and a FIN, then keep reading: TLS's half-close."""
        if self._eof_sent or self.closing:
            return
        self._eof_sent = True
        try:
            self._obj.unwrap()
        except ssl.SSLWantReadError:
            pass  # close_notify is written; the peer's answer comes when it is done sending
        except ssl.SSLError:
            pass
        self._flush()
        if self._tcp is not None and self._tcp.can_write_eof():
            self._tcp.write_eof()
        if self._eof_delivered:
            self.close()

    def close(self) -> None:
        if self.closing:
            return
        if not self._eof_sent and self._handshake.done() and not self._lost:
            self._eof_sent = True
            with contextlib.suppress(ssl.SSLError):
                self._obj.unwrap()
            self._flush()
        self.closing = True
        if self._tcp is not None:
            self._tcp.close()

    def abort(self) -> None:
        self.closing = True
        if self._tcp is not None:
            self._tcp.abort()

    def pause_reading(self) -> None:
        if not self.reading_paused:
            self.reading_paused = True
            if self._tcp is not None:
                self._tcp.pause_reading()

    def resume_reading(self) -> None:
        if self.reading_paused:
            self.reading_paused = False
            if self._tcp is not None and not self._tcp.is_closing():
                self._tcp.resume_reading()
            asyncio.get_running_loop().call_soon(self._pump)

    def write_buffer_size(self) -> int:
        return (self._tcp.get_write_buffer_size() if self._tcp is not None else 0) + self._out.pending

    def set_write_buffer_limits(self, high: int | None, low: int | None) -> None:
        if self._tcp is not None:
            self._tcp.set_write_buffer_limits(high, low)


async def open_tls_connection(
    host: str,
    port: int,
    ctx: ssl.SSLContext,
    *,
    server_hostname: str | None = None,
    limit: int = 1 << 20,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Like `asyncio.open_connection(ssl=ctx)`, but the writer's `write_eof()` works."""
    loop = asyncio.get_running_loop()
    handshake: asyncio.Future[None] = loop.create_future()
    conn = _TLSConnection(ctx, server_hostname, handshake)
    tcp, _ = await loop.create_connection(lambda: conn, host, port)
    try:
        await handshake
    except BaseException:
        tcp.abort()
        raise
    reader = asyncio.StreamReader(limit=limit, loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    conn.start(protocol)
    writer = asyncio.StreamWriter(conn.transport, protocol, reader, loop)
    return reader, writer
