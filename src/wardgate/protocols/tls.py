"""Sans-IO reader for a TLS ClientHello: what the one-port router sees before the handshake.

The router peeks at the first bytes of every connection to reject what is not TLS (a port
scanner, plain HTTP, garbage) with a useful message, and to learn the SNI and offered ALPN
before it spends a handshake. Bytes in, `NeedMore` or a `ClientHello` out; anything else is a
`ProtocolError`. The parser never trusts a length: every field is bounds-checked, and the whole
ClientHello (record headers included) is capped at `MAX_CLIENT_HELLO` bytes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from wardgate.protocols.errors import ProtocolError

MAX_CLIENT_HELLO = 16 * 1024
"""Most wire bytes (records and their headers) a ClientHello may take; real ones are < 2 KiB."""

RECORD_HANDSHAKE = 22
HANDSHAKE_CLIENT_HELLO = 1
MAX_RECORD = 1 << 14

EXT_SERVER_NAME = 0
EXT_ALPN = 16
EXT_SUPPORTED_VERSIONS = 43

_VERSION_NAMES = {0x0300: "SSLv3", 0x0301: "TLSv1.0", 0x0302: "TLSv1.1", 0x0303: "TLSv1.2", 0x0304: "TLSv1.3"}
_HTTP_START = re.compile(rb"[A-Z]{3,10} |[A-Z]{1,10}\Z")


@dataclass(frozen=True, slots=True)
class NeedMore:
    """Not enough bytes yet: `needed` is the total buffer length before parsing can progress."""

    needed: int


@dataclass(frozen=True, slots=True)
class ClientHello:
    """What the client offered. `size` is how many wire bytes the ClientHello records took."""

    sni: str | None
    alpn: list[str] = field(default_factory=list)
    tls_versions: list[str] = field(default_factory=list)
    legacy_version: str = "TLSv1.2"
    extensions: list[int] = field(default_factory=list)
    size: int = 0


def version_name(v: int) -> str:
    return _VERSION_NAMES.get(v, f"0x{v:04x}")


def _is_grease(v: int) -> bool:
    """RFC 8701 GREASE values (0x0a0a, 0x1a1a, …) are noise clients add on purpose."""
    return (v & 0x0F0F) == 0x0A0A and (v >> 8) == (v & 0xFF)


def _not_tls(first: memoryview) -> ProtocolError:
    """Name what the bytes look like, so the person at the other end knows what to change."""
    head = bytes(first[:16])
    if head.startswith(b"SSH-"):
        return ProtocolError(
            "looks like plain SSH: this port speaks TLS; use `ward ssh` or `ward proxy ssh`", kind="not_tls"
        )
    if _HTTP_START.match(head):
        return ProtocolError("looks like plain HTTP: use https://", kind="plain_http")
    if len(head) >= 3 and head[0] & 0x80 and head[2] == 1:
        return ProtocolError("SSLv2-style ClientHello: TLS 1.2 or newer is required", kind="not_tls")
    return ProtocolError(
        f"not TLS: the first byte is 0x{head[0]:02x}; a TLS handshake starts with 0x16", kind="not_tls"
    )


def _oversized(n: int) -> ProtocolError:
    return ProtocolError(
        f"ClientHello too large: needs {n} bytes, the limit is {MAX_CLIENT_HELLO}", kind="oversized"
    )


def parse_client_hello(data: bytes | bytearray | memoryview) -> ClientHello | NeedMore:
    """Parse a ClientHello from the start of `data` (the whole buffer seen so far).

    Stateless, so a caller that peeks at a socket can call it again with the longer buffer.
    Bytes after the ClientHello (the client may pipeline more) are ignored.
    """
    mv = memoryview(data).cast("B")
    if len(mv) == 0:
        return NeedMore(5)
    if mv[0] != RECORD_HANDSHAKE:
        raise _not_tls(mv)
    hs = bytearray()
    msg_len: int | None = None
    pos = 0
    while True:
        if len(mv) - pos < 5:
            # Judge a partial header now: garbage should not wait for the deadline.
            if pos == 0 and len(mv) >= 2 and mv[1] != 3:
                raise ProtocolError(f"not TLS: record version {mv[1]}.x", kind="not_tls")
            return NeedMore(pos + 5)
        ctype, major, minor = mv[pos], mv[pos + 1], mv[pos + 2]
        rlen = (mv[pos + 3] << 8) | mv[pos + 4]
        if ctype != RECORD_HANDSHAKE:
            raise _malformed(f"interrupted by a record of type {ctype}")
        if major != 3 or minor > 4:
            if pos == 0:
                raise ProtocolError(f"not TLS: record version {major}.{minor}", kind="not_tls")
            raise _malformed(f"record version {major}.{minor}")
        if rlen == 0:
            raise _malformed("empty handshake record")
        if rlen > MAX_RECORD:
            raise _malformed(f"record of {rlen} bytes exceeds 2^14")
        end = pos + 5 + rlen
        if end > MAX_CLIENT_HELLO:
            raise _oversized(end)
        hs += mv[pos + 5 : min(end, len(mv))]
        if msg_len is None and len(hs) >= 4:
            if hs[0] != HANDSHAKE_CLIENT_HELLO:
                raise _malformed(f"first handshake message has type {hs[0]}")
            msg_len = int.from_bytes(hs[1:4], "big")
            # Each further record adds a 5-byte header: the least the whole message can take.
            least = 5 + 4 + msg_len
            if least > MAX_CLIENT_HELLO:
                raise _oversized(least)
        if end > len(mv):
            return NeedMore(end)
        pos = end
        if msg_len is not None and len(hs) >= 4 + msg_len:
            return _parse_body(memoryview(hs)[4 : 4 + msg_len], pos)


class ClientHelloReader:
    """Incremental front end: feed bytes as they arrive until a `ClientHello` comes out."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self.result: ClientHello | None = None

    @property
    def buffered(self) -> bytes:
        """Every byte fed so far; a proxy forwards these to whoever speaks TLS next."""
        return bytes(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> ClientHello | NeedMore:
        if self.result is not None:
            self._buf += data
            return self.result
        self._buf += data
        out = parse_client_hello(self._buf)
        if isinstance(out, ClientHello):
            self.result = out
        return out


class _Cursor:
    """Bounds-checked reads over the ClientHello body; any overrun is a malformed message."""

    __slots__ = ("end", "mv", "pos")

    def __init__(self, mv: memoryview, pos: int = 0, end: int | None = None) -> None:
        self.mv = mv
        self.pos = pos
        self.end = len(mv) if end is None else end

    @property
    def remaining(self) -> int:
        return self.end - self.pos

    def take(self, n: int, what: str) -> memoryview:
        if n > self.end - self.pos:
            raise ProtocolError(f"malformed ClientHello: {what} runs past its container", kind="malformed")
        out = self.mv[self.pos : self.pos + n]
        self.pos += n
        return out

    def take_all(self) -> memoryview:
        return self.take(self.remaining, "field")

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def u16(self, what: str) -> int:
        b = self.take(2, what)
        return (b[0] << 8) | b[1]

    def vec(self, width: int, what: str) -> _Cursor:
        n = self.u8(what) if width == 1 else self.u16(what)
        start = self.pos
        self.take(n, what)
        return _Cursor(self.mv, start, start + n)


def _malformed(what: str) -> ProtocolError:
    return ProtocolError(f"malformed ClientHello: {what}", kind="malformed")


def _parse_body(body: memoryview, size: int) -> ClientHello:
    c = _Cursor(body)
    legacy = c.u16("legacy_version")
    c.take(32, "random")
    if c.vec(1, "session_id").remaining > 32:
        raise _malformed("session_id longer than 32 bytes")
    suites = c.vec(2, "cipher_suites")
    if suites.remaining == 0 or suites.remaining % 2:
        raise _malformed("cipher_suites must be a non-empty list of 2-byte values")
    if c.vec(1, "compression_methods").remaining == 0:
        raise _malformed("no compression methods")
    sni: str | None = None
    alpn: list[str] = []
    versions: list[str] = []
    types: list[int] = []
    if c.remaining:
        exts = c.vec(2, "extensions")
        if c.remaining:
            raise _malformed("trailing bytes after the extensions")
        while exts.remaining:
            etype = exts.u16("extension type")
            edata = exts.vec(2, f"extension {etype}")
            if etype in types:
                raise _malformed(f"extension {etype} appears twice")
            types.append(etype)
            if etype == EXT_SERVER_NAME:
                sni = _server_name(edata)
            elif etype == EXT_ALPN:
                alpn = _alpn(edata)
            elif etype == EXT_SUPPORTED_VERSIONS:
                versions = _supported_versions(edata)
    elif c.remaining:
        raise _malformed("trailing bytes")
    if not versions:
        versions = [version_name(legacy)]
    return ClientHello(
        sni=sni,
        alpn=alpn,
        tls_versions=versions,
        legacy_version=version_name(legacy),
        extensions=types,
        size=size,
    )


def _server_name(c: _Cursor) -> str | None:
    names = c.vec(2, "server_name list")
    if c.remaining:
        raise _malformed("trailing bytes in server_name")
    host: str | None = None
    while names.remaining:
        ntype = names.u8("server_name type")
        raw = bytes(names.vec(2, "server_name").take_all())
        if ntype == 0 and host is None:
            if not raw:
                raise _malformed("empty server_name")
            try:
                host = raw.decode("ascii")
            except UnicodeDecodeError:
                raise _malformed("server_name is not ASCII (IDNs must be sent as A-labels)") from None
            if not host.isprintable():
                raise _malformed("server_name has control characters")
    return host


def _alpn(c: _Cursor) -> list[str]:
    protos = c.vec(2, "ALPN list")
    if c.remaining:
        raise _malformed("trailing bytes in ALPN")
    out: list[str] = []
    while protos.remaining:
        raw = bytes(protos.vec(1, "ALPN protocol").take_all())
        if not raw:
            raise _malformed("empty ALPN protocol name")
        out.append(raw.decode("latin-1"))
    if not out:
        raise _malformed("empty ALPN list")
    return out


def _supported_versions(c: _Cursor) -> list[str]:
    vs = c.vec(1, "supported_versions")
    if c.remaining:
        raise _malformed("trailing bytes in supported_versions")
    if vs.remaining == 0 or vs.remaining % 2:
        raise _malformed("supported_versions must be a non-empty list of 2-byte values")
    out: list[str] = []
    while vs.remaining:
        v = vs.u16("version")
        if not _is_grease(v):
            out.append(version_name(v))
    return out
