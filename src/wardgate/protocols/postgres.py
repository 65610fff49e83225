"""Sans-IO codec for the PostgreSQL v3 wire protocol: what the database proxy reads and writes.

The proxy reads the client's startup packet (`SSLRequest`, `GSSENCRequest`, `CancelRequest` or a
`StartupMessage`), authenticates the client by its certificate, logs in upstream as the requested
user (trust, cleartext, MD5, SCRAM-SHA-256 or mutual TLS), then relays both ways while auditing the
client's queries. Bytes in, messages out; no sockets.

- `FrontendReader` / `BackendReader` turn bytes into frozen dataclasses, each keeping `raw` (its
  exact wire bytes) so the proxy forwards what it read without re-encoding. Anything malformed is a
  `ProtocolError`; message sizes are capped (1 MiB by default) and no length is trusted.
- Module functions encode the messages the proxy sends itself (startup, auth, errors, ...).
- `md5_password` and `ScramSha256Client` answer upstream password challenges.
- `describe_params` and `ExtendedQueryTracker` turn the extended query protocol
  (`Parse`/`Bind`/`Execute`) into `(query text, parameters)` for the audit log.

Text fields are UTF-8 (the proxy's upstream sessions use `client_encoding=UTF8`); SQL text and
server messages are decoded with replacement characters (display only: `raw` keeps the bytes),
statement and portal names with `surrogateescape` so distinct names never collide, and startup
parameters strictly (a user name must mean exactly one thing).
"""

from __future__ import annotations

import base64
import binascii
import codecs
import hashlib
import hmac
import re
import secrets
import stringprep
import struct
import unicodedata
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from wardgate.protocols.errors import ProtocolError

MAX_MESSAGE = 1 << 20
"""Default cap on one message's declared length (1 MiB); the reader never buffers more."""

MAX_STARTUP = 10_000
"""Cap on a startup packet, as the server itself enforces (`MAX_STARTUP_PACKET_LENGTH`)."""

PROTOCOL_VERSION = 196608
"""Protocol 3.0 (`3 << 16`)."""

SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102
_NEGOTIATE_MAJOR = 1234

AUTH_OK = 0
AUTH_KERBEROS_V5 = 2
AUTH_CLEARTEXT = 3
AUTH_MD5 = 5
AUTH_GSS = 7
AUTH_GSS_CONTINUE = 8
AUTH_SSPI = 9
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12

SCRAM_SHA_256 = "SCRAM-SHA-256"

FORMAT_TEXT = 0
FORMAT_BINARY = 1

_I16 = struct.Struct("!h")
_U16 = struct.Struct("!H")
_I32 = struct.Struct("!i")
_U32 = struct.Struct("!I")
_HEADER = struct.Struct("!ci")
_MAX_SECRET = 256
"""Longest cancel key protocol 3.2 allows; 3.0 keys are 4 bytes."""


# --------------------------------------------------------------------------------------------
# Messages


@dataclass(frozen=True, slots=True)
class SSLRequest:
    """The client asks for TLS; the server answers one byte, `S` or `N` (see `read_ssl_answer`)."""

    raw: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class GSSENCRequest:
    """The client asks for GSSAPI encryption; answered `G` or `N` like an `SSLRequest`."""

    raw: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class CancelRequest:
    """Cancel the query running on backend `pid`; `secret` is 4 bytes (protocol 3.2: up to 256)."""

    pid: int
    secret: bytes = field(repr=False)
    raw: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class StartupMessage:
    """`version` is `major << 16 | minor` (3.0 = 196608); `params` in the order the client sent."""

    version: int
    params: dict[str, str]
    raw: bytes = field(repr=False)

    @property
    def user(self) -> str | None:
        return self.params.get("user")

    @property
    def database(self) -> str | None:
        """The database asked for; the server defaults it to the user name."""
        return self.params.get("database", self.params.get("user"))

    @property
    def version_str(self) -> str:
        return f"{self.version >> 16}.{self.version & 0xFFFF}"


@dataclass(frozen=True, slots=True)
class Query:
    """Simple query: one string that may hold several statements."""

    sql: str
    raw: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class Parse:
    """Prepare `query` as `statement` ("" is the unnamed statement); OID 0 leaves a type to the server."""

    statement: str
    query: str
    param_types: tuple[int, ...]
    raw: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class Bind:
    """Bind `params` (None is SQL NULL) to `statement`, making `portal` ("" is the unnamed portal)."""

    portal: str
    statement: str
    param_formats: tuple[int, ...]
    params: tuple[bytes | None, ...]
    result_formats: tuple[int, ...]
    raw: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class Execute:
    """Run `portal`; `max_rows` 0 means all rows."""

    portal: str
    max_rows: int
    raw: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class Describe:
    """`kind` is `b"S"` (statement) or `b"P"` (portal)."""

    kind: bytes
    name: str
    raw: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class Close:
    """`kind` is `b"S"` (statement) or `b"P"` (portal)."""

    kind: bytes
    name: str
    raw: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class Sync:
    raw: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class Flush:
    raw: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class Terminate:
    raw: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class PasswordMessage:
    """Every `p` message: a password, a SASL initial response or response, or a GSS token.

    Which one it is depends on the authentication request it answers, so the body stays opaque
    (and out of `repr`): read it with `password()`, `sasl_initial_response()` or `data`.
    """

    data: bytes = field(repr=False)
    raw: bytes = field(repr=False)

    def password(self) -> str:
        """The cleartext or `md5…` password string (answering code 3 or 5)."""
        if not self.data.endswith(b"\0") or b"\0" in self.data[:-1]:
            raise ProtocolError("malformed PasswordMessage: the password is not one NUL-terminated string")
        try:
            return self.data[:-1].decode()
        except UnicodeDecodeError:
            raise ProtocolError("malformed PasswordMessage: the password is not UTF-8") from None

    def sasl_initial_response(self) -> tuple[str, bytes | None]:
        """`(mechanism, initial data or None)` (answering code 10)."""
        c = _Body(self.data, "SASLInitialResponse")
        mechanism = c.cstr("replace")
        n = c.i32()
        if n < -1:
            raise ProtocolError(f"malformed SASLInitialResponse: data length {n}")
        data = None if n == -1 else c.take(n)
        c.done()
        return mechanism, data

    def sasl_response(self) -> bytes:
        """The SASL data (answering code 11): the whole body."""
        return self.data


@dataclass(frozen=True, slots=True)
class CopyData:
    data: bytes = field(repr=False)
    raw: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class CopyDone:
    raw: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class CopyFail:
    message: str
    raw: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class FunctionCall:
    """The legacy fast-path call: function `oid` with `args` (None is NULL)."""

    oid: int
    arg_formats: tuple[int, ...]
    args: tuple[bytes | None, ...]
    result_format: int
    raw: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class UnknownMessage:
    """A frontend message this codec does not interpret; forward `raw` as is."""

    type: bytes
    body: bytes = field(repr=False)
    raw: bytes = field(repr=False)


StartupPacket = SSLRequest | GSSENCRequest | CancelRequest | StartupMessage
FrontendMessage = (
    StartupPacket
    | Query
    | Parse
    | Bind
    | Execute
    | Describe
    | Close
    | Sync
    | Flush
    | Terminate
    | PasswordMessage
    | CopyData
    | CopyDone
    | CopyFail
    | FunctionCall
    | UnknownMessage
)


@dataclass(frozen=True, slots=True)
class Authentication:
    """An `R` message: `code` says which (0 ok, 3 cleartext, 5 md5, 10/11/12 SASL), `data` the rest."""

    code: int
    data: bytes
    raw: bytes = field(repr=False)

    @property
    def salt(self) -> bytes:
        """The 4-byte salt of an MD5 request."""
        if self.code != AUTH_MD5:
            raise ValueError(f"authentication code {self.code} carries no MD5 salt")
        return self.data

    @property
    def mechanisms(self) -> tuple[str, ...]:
        """The SASL mechanisms the server offers (code 10)."""
        if self.code != AUTH_SASL:
            raise ValueError(f"authentication code {self.code} carries no SASL mechanisms")
        return _sasl_mechanisms(self.data)


@dataclass(frozen=True, slots=True)
class ParameterStatus:
    name: str
    value: str
    raw: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class BackendKeyData:
    """What a `CancelRequest` must quote: `secret` is 4 bytes (protocol 3.2: up to 256)."""

    pid: int
    secret: bytes = field(repr=False)
    raw: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class ReadyForQuery:
    """`status`: `b"I"` idle, `b"T"` in a transaction, `b"E"` in a failed transaction."""

    status: bytes
    raw: bytes = field(repr=False)


class _Fields:
    """Accessors for the fields of an error or notice (codes per the protocol's field list)."""

    __slots__ = ()
    fields: dict[str, str]

    @property
    def severity(self) -> str:
        return self.fields.get("V", self.fields.get("S", ""))

    @property
    def code(self) -> str:
        return self.fields.get("C", "")

    @property
    def message(self) -> str:
        return self.fields.get("M", "")

    @property
    def detail(self) -> str:
        return self.fields.get("D", "")

    @property
    def hint(self) -> str:
        return self.fields.get("H", "")


@dataclass(frozen=True, slots=True)
class ErrorResponse(_Fields):
    fields: dict[str, str]
    raw: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class NoticeResponse(_Fields):
    fields: dict[str, str]
    raw: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class BackendMessage:
    """Any other backend message (rows, completions, copy, ...): relayed without interpretation."""

    type: bytes
    body: bytes = field(repr=False)
    raw: bytes = field(repr=False)


ServerMessage = (
    Authentication
    | ParameterStatus
    | BackendKeyData
    | ReadyForQuery
    | ErrorResponse
    | NoticeResponse
    | BackendMessage
)


# --------------------------------------------------------------------------------------------
# Body parsing


class _Body:
    """Bounds-checked reads over one message body; every overrun names the message."""

    __slots__ = ("buf", "name", "pos")

    def __init__(self, buf: bytes, name: str) -> None:
        self.buf = buf
        self.name = name
        self.pos = 0

    def error(self, what: str) -> ProtocolError:
        return ProtocolError(f"malformed {self.name} message: {what}")

    def take(self, n: int) -> bytes:
        if n > len(self.buf) - self.pos:
            raise self.error(f"needs {n} more bytes, {len(self.buf) - self.pos} left")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def rest(self) -> bytes:
        return self.take(len(self.buf) - self.pos)

    def i16(self) -> int:
        return _I16.unpack(self.take(2))[0]

    def u16(self) -> int:
        return _U16.unpack(self.take(2))[0]

    def i32(self) -> int:
        return _I32.unpack(self.take(4))[0]

    def u32(self) -> int:
        return _U32.unpack(self.take(4))[0]

    def oids(self) -> tuple[int, ...]:
        """A uint16 count, then that many uint32 type OIDs."""
        n = self.u16()
        return struct.unpack(f"!{n}I", self.take(4 * n))

    def cbytes(self) -> bytes:
        end = self.buf.find(b"\0", self.pos)
        if end < 0:
            raise self.error("string is not NUL-terminated")
        out = self.buf[self.pos : end]
        self.pos = end + 1
        return out

    def cstr(self, errors: str) -> str:
        raw = self.cbytes()
        try:
            return raw.decode("utf-8", errors)
        except UnicodeDecodeError:
            raise self.error(f"string {raw[:40]!r} is not UTF-8") from None

    def kind(self) -> bytes:
        k = self.take(1)
        if k not in (b"S", b"P"):
            raise self.error(f"kind {k!r} is neither 'S' (statement) nor 'P' (portal)")
        return k

    def formats(self, what: str) -> tuple[int, ...]:
        n = self.u16()
        out = struct.unpack(f"!{n}h", self.take(2 * n))
        for f in out:
            if f not in (FORMAT_TEXT, FORMAT_BINARY):
                raise self.error(f"{what} format code {f} (0 is text, 1 is binary)")
        return out

    def values(self) -> tuple[bytes | None, ...]:
        n = self.u16()
        out: list[bytes | None] = []
        for _ in range(n):
            size = self.i32()
            if size == -1:
                out.append(None)
            elif size < 0:
                raise self.error(f"value length {size}")
            else:
                out.append(self.take(size))
        return tuple(out)

    def done(self) -> None:
        if self.pos != len(self.buf):
            raise self.error(f"{len(self.buf) - self.pos} unexpected bytes at the end")


def _check_formats(c: _Body, formats: tuple[int, ...], values: int, what: str) -> None:
    if len(formats) > 1 and len(formats) != values:
        raise c.error(f"{len(formats)} {what} formats for {values} {what}s")


def _empty(cls: Callable[[bytes], FrontendMessage], name: str) -> Callable[[bytes, bytes], FrontendMessage]:
    def parse(body: bytes, raw: bytes) -> FrontendMessage:
        if body:
            raise ProtocolError(f"malformed {name} message: {len(body)} bytes of body, expected none")
        return cls(raw)

    return parse


def _parse_query(body: bytes, raw: bytes) -> Query:
    c = _Body(body, "Query")
    sql = c.cstr("replace")
    c.done()
    return Query(sql, raw)


def _parse_parse(body: bytes, raw: bytes) -> Parse:
    c = _Body(body, "Parse")
    name = c.cstr("surrogateescape")
    sql = c.cstr("replace")
    types = c.oids()
    c.done()
    return Parse(name, sql, types, raw)


def _parse_bind(body: bytes, raw: bytes) -> Bind:
    c = _Body(body, "Bind")
    portal = c.cstr("surrogateescape")
    statement = c.cstr("surrogateescape")
    formats = c.formats("parameter")
    params = c.values()
    _check_formats(c, formats, len(params), "parameter")
    results = c.formats("result")
    c.done()
    return Bind(portal, statement, formats, params, results, raw)


def _parse_execute(body: bytes, raw: bytes) -> Execute:
    c = _Body(body, "Execute")
    portal = c.cstr("surrogateescape")
    max_rows = c.i32()
    c.done()
    return Execute(portal, max_rows, raw)


def _parse_describe(body: bytes, raw: bytes) -> Describe:
    c = _Body(body, "Describe")
    kind = c.kind()
    name = c.cstr("surrogateescape")
    c.done()
    return Describe(kind, name, raw)


def _parse_close(body: bytes, raw: bytes) -> Close:
    c = _Body(body, "Close")
    kind = c.kind()
    name = c.cstr("surrogateescape")
    c.done()
    return Close(kind, name, raw)


def _parse_copy_fail(body: bytes, raw: bytes) -> CopyFail:
    c = _Body(body, "CopyFail")
    msg = c.cstr("replace")
    c.done()
    return CopyFail(msg, raw)


def _parse_function_call(body: bytes, raw: bytes) -> FunctionCall:
    c = _Body(body, "FunctionCall")
    oid = c.u32()
    formats = c.formats("argument")
    args = c.values()
    _check_formats(c, formats, len(args), "argument")
    result = c.i16()
    if result not in (FORMAT_TEXT, FORMAT_BINARY):
        raise c.error(f"result format code {result} (0 is text, 1 is binary)")
    c.done()
    return FunctionCall(oid, formats, args, result, raw)


_FRONTEND_PARSERS: dict[bytes, Callable[[bytes, bytes], FrontendMessage]] = {
    b"Q": _parse_query,
    b"P": _parse_parse,
    b"B": _parse_bind,
    b"E": _parse_execute,
    b"D": _parse_describe,
    b"C": _parse_close,
    b"S": _empty(Sync, "Sync"),
    b"H": _empty(Flush, "Flush"),
    b"X": _empty(Terminate, "Terminate"),
    b"p": lambda body, raw: PasswordMessage(body, raw),
    b"d": lambda body, raw: CopyData(body, raw),
    b"c": _empty(CopyDone, "CopyDone"),
    b"f": _parse_copy_fail,
    b"F": _parse_function_call,
}


def _parse_fields(body: bytes, name: str) -> dict[str, str]:
    c = _Body(body, name)
    fields: dict[str, str] = {}
    while True:
        code = c.take(1)
        if code == b"\0":
            break
        fields[code.decode("latin-1")] = c.cstr("replace")
    c.done()
    return fields


def _sasl_mechanisms(data: bytes) -> tuple[str, ...]:
    c = _Body(data, "AuthenticationSASL")
    out: list[str] = []
    while True:
        mech = c.cstr("replace")
        if not mech:
            break
        out.append(mech)
    c.done()
    return tuple(out)


def _parse_authentication(body: bytes, raw: bytes) -> Authentication:
    c = _Body(body, "Authentication")
    code = c.i32()
    data = c.rest()
    expected = {AUTH_OK: 0, AUTH_CLEARTEXT: 0, AUTH_MD5: 4, AUTH_KERBEROS_V5: 0, AUTH_GSS: 0, AUTH_SSPI: 0}
    if code in expected and len(data) != expected[code]:
        raise c.error(f"code {code} with {len(data)} bytes of data, expected {expected[code]}")
    if code == AUTH_SASL:
        _sasl_mechanisms(data)
    return Authentication(code, data, raw)


def _parse_parameter_status(body: bytes, raw: bytes) -> ParameterStatus:
    c = _Body(body, "ParameterStatus")
    name = c.cstr("replace")
    value = c.cstr("replace")
    c.done()
    return ParameterStatus(name, value, raw)


def _parse_key_data(body: bytes, raw: bytes) -> BackendKeyData:
    c = _Body(body, "BackendKeyData")
    pid = c.u32()
    secret = c.rest()
    if not 4 <= len(secret) <= _MAX_SECRET:
        raise c.error(f"secret key of {len(secret)} bytes (4 to {_MAX_SECRET} allowed)")
    return BackendKeyData(pid, secret, raw)


def _parse_ready(body: bytes, raw: bytes) -> ReadyForQuery:
    if len(body) != 1 or body not in b"ITE":
        raise ProtocolError(f"malformed ReadyForQuery message: status {body!r} is not I, T or E")
    return ReadyForQuery(body, raw)


_BACKEND_PARSERS: dict[bytes, Callable[[bytes, bytes], ServerMessage]] = {
    b"R": _parse_authentication,
    b"S": _parse_parameter_status,
    b"K": _parse_key_data,
    b"Z": _parse_ready,
    b"E": lambda body, raw: ErrorResponse(_parse_fields(body, "ErrorResponse"), raw),
    b"N": lambda body, raw: NoticeResponse(_parse_fields(body, "NoticeResponse"), raw),
}


# --------------------------------------------------------------------------------------------
# Readers


def _too_big(length: int, limit: int, what: str = "message") -> ProtocolError:
    return ProtocolError(f"{what} of {length} bytes exceeds the {limit}-byte limit", kind="oversized")


class _TypedFramer:
    """Splits `type byte + int32 length (counting itself) + body` frames out of a byte stream."""

    __slots__ = ("_buf", "max_message")

    def __init__(self, max_message: int) -> None:
        self.max_message = max_message
        self._buf = bytearray()

    @property
    def in_message(self) -> bool:
        """True with bytes of an unfinished message buffered: an EOF now cuts a message short."""
        return bool(self._buf)

    def _frames(self, side: str) -> list[tuple[bytes, bytes, bytes]]:
        """Whole frames buffered as `(type, body, raw)`; a partial one stays in the buffer."""
        buf = self._buf
        out: list[tuple[bytes, bytes, bytes]] = []
        pos = 0
        n = len(buf)
        while n - pos >= 1:
            t = buf[pos]
            if not (0x30 <= t <= 0x39 or 0x41 <= t <= 0x5A or 0x61 <= t <= 0x7A):
                raise ProtocolError(f"not a PostgreSQL {side} message: type byte 0x{t:02x}")
            if n - pos < 5:
                break
            length = _I32.unpack_from(buf, pos + 1)[0]
            if length < 4:
                raise ProtocolError(f"{side} message {chr(t)!r} has length {length}; the minimum is 4")
            if length > self.max_message:
                raise _too_big(length, self.max_message)
            end = pos + 1 + length
            if end > n:
                break
            raw = bytes(buf[pos:end])
            out.append((raw[:1], raw[5:], raw))
            pos = end
        del buf[:pos]
        return out


Phase = Literal["startup", "negotiating", "typed", "closed"]


class FrontendReader(_TypedFramer):
    """Feed client bytes, get client messages.

    Phases: `startup` (untyped packets) until a `StartupMessage` switches to `typed`. After an
    `SSLRequest`/`GSSENCRequest` the reader is `negotiating`: the caller answers, upgrades the
    stream or not, and calls `expect_startup()`; bytes arriving before that are refused (a client
    must wait for the answer, and plaintext that precedes a TLS handshake could be injected by a
    man in the middle, CVE-2021-23214). After a `CancelRequest` or `Terminate` it is `closed`
    and any further byte is an error.
    """

    __slots__ = ("phase",)

    def __init__(self, *, max_message: int = MAX_MESSAGE) -> None:
        super().__init__(max_message)
        self.phase: Phase = "startup"

    def expect_startup(self) -> None:
        """After answering an SSL/GSSENC request (and any TLS upgrade): read startup packets again."""
        if self.phase not in ("startup", "negotiating"):
            raise RuntimeError(f"expect_startup() in the {self.phase} phase")
        self.phase = "startup"

    def feed(self, data: bytes | bytearray | memoryview) -> list[FrontendMessage]:
        if not data:
            return []
        if self.phase == "negotiating":
            raise ProtocolError(
                f"client sent {len(data)} bytes after its encryption request, before the answer",
                kind="unexpected_data",
            )
        if self.phase == "closed":
            raise ProtocolError(
                f"client sent {len(data)} bytes after ending the session", kind="unexpected_data"
            )
        self._buf += data
        out: list[FrontendMessage] = []
        while self.phase == "startup":
            packet = self._startup_packet()
            if packet is None:
                return out
            out.append(packet)
            if isinstance(packet, StartupMessage):
                self.phase = "typed"
            elif isinstance(packet, CancelRequest):
                self.phase = "closed"
            else:
                self.phase = "negotiating"
            if self.phase != "typed" and self._buf:
                what = "CancelRequest" if self.phase == "closed" else "encryption request"
                raise ProtocolError(
                    f"client sent {len(self._buf)} bytes after its {what} without waiting",
                    kind="unexpected_data",
                )
        if self.phase != "typed":
            return out
        for t, body, raw in self._frames("frontend"):
            if self.phase == "closed":
                raise ProtocolError("client sent messages after Terminate", kind="unexpected_data")
            parser = _FRONTEND_PARSERS.get(t)
            msg = UnknownMessage(t, body, raw) if parser is None else parser(body, raw)
            out.append(msg)
            if isinstance(msg, Terminate):
                self.phase = "closed"
        if self.phase == "closed" and self._buf:
            raise ProtocolError("client sent bytes after Terminate", kind="unexpected_data")
        return out

    def _startup_packet(self) -> StartupPacket | None:
        buf = self._buf
        if not buf:
            return None
        if buf[0] == 0x16:
            raise ProtocolError(
                "client started TLS directly (a ClientHello, not an SSLRequest); this port expects "
                "PostgreSQL's SSLRequest negotiation",
                kind="direct_tls",
            )
        if len(buf) < 4:
            return None
        length = _I32.unpack_from(buf)[0]
        limit = min(self.max_message, MAX_STARTUP)
        if length > limit:
            if re.match(rb"[A-Z]{3,10} ", bytes(buf[:11])) or bytes(buf[:4]).isalpha():
                raise ProtocolError("looks like plain HTTP, not PostgreSQL", kind="plain_http")
            raise _too_big(length, limit, "startup packet")
        if length < 8:
            raise ProtocolError(f"startup packet length {length} is less than 8")
        if len(buf) < length:
            return None
        raw = bytes(buf[:length])
        del buf[:length]
        code = _I32.unpack_from(raw, 4)[0]
        c = _Body(raw[8:], "startup")
        if code in (SSL_REQUEST_CODE, GSSENC_REQUEST_CODE):
            c.name = "SSLRequest" if code == SSL_REQUEST_CODE else "GSSENCRequest"
            c.done()
            return SSLRequest(raw) if code == SSL_REQUEST_CODE else GSSENCRequest(raw)
        if code == CANCEL_REQUEST_CODE:
            c.name = "CancelRequest"
            pid = c.u32()
            secret = c.rest()
            if not 4 <= len(secret) <= _MAX_SECRET:
                raise c.error(f"secret key of {len(secret)} bytes (4 to {_MAX_SECRET} allowed)")
            return CancelRequest(pid, secret, raw)
        major, minor = code >> 16 & 0xFFFF, code & 0xFFFF
        if major == _NEGOTIATE_MAJOR:
            raise ProtocolError(f"unknown startup request code {major}.{minor}")
        if major != 3:
            raise ProtocolError(
                f"unsupported frontend protocol {major}.{minor}: only protocol 3 is supported",
                kind="unsupported_version",
            )
        c.name = "StartupMessage"
        params: dict[str, str] = {}
        while True:
            key = c.cstr("strict")
            if not key:
                break
            if key in params:
                raise c.error(f"parameter {key!r} given twice")
            params[key] = c.cstr("strict")
        c.done()
        return StartupMessage(code, params, raw)


class BackendReader(_TypedFramer):
    """Feed server bytes, get server messages. (The one-byte answer to an `SSLRequest` is not a
    message: read it with `read_ssl_answer` before feeding anything here.)"""

    __slots__ = ()

    def __init__(self, *, max_message: int = MAX_MESSAGE) -> None:
        super().__init__(max_message)

    def feed(self, data: bytes | bytearray | memoryview) -> list[ServerMessage]:
        self._buf += data
        out: list[ServerMessage] = []
        for t, body, raw in self._frames("backend"):
            parser = _BACKEND_PARSERS.get(t)
            out.append(BackendMessage(t, body, raw) if parser is None else parser(body, raw))
        return out


def read_ssl_answer(data: bytes | bytearray | int) -> bool:
    """The server's answer to an `SSLRequest`: True for `S` (start TLS), False for `N` (plaintext).

    Pass everything read so far: more than the one byte is an error, since bytes that arrive
    before the TLS handshake could be injected by a man in the middle (CVE-2021-23222).
    """
    if isinstance(data, int):
        data = bytes([data])
    if len(data) != 1:
        if data[:1] in (b"S", b"N"):
            raise ProtocolError(
                f"server sent {len(data) - 1} unexpected bytes after its SSL answer", kind="unexpected_data"
            )
        if not data:
            raise ProtocolError("no SSL answer from the server")
    if data[:1] == b"S":
        return True
    if data[:1] == b"N":
        return False
    if data[:1] == b"E":
        raise ProtocolError("server answered the SSLRequest with an error (a very old server?)")
    raise ProtocolError(f"server answered the SSLRequest with 0x{data[0]:02x}, not 'S' or 'N'")


# --------------------------------------------------------------------------------------------
# Encoders


def _c(s: str, what: str, errors: str = "strict") -> bytes:
    b = s.encode("utf-8", errors)
    if b"\0" in b:
        raise ValueError(f"{what} contains a NUL character")
    return b + b"\0"


def encode_message(type: bytes, body: bytes = b"") -> bytes:
    """One typed message: `type` (one byte), the length, then `body`."""
    if len(type) != 1:
        raise ValueError(f"message type must be one byte, got {type!r}")
    if len(body) > 0x7FFFFFFF - 4:
        raise ValueError(f"message body of {len(body)} bytes is too large")
    return type + _I32.pack(len(body) + 4) + body


def _untyped(body: bytes) -> bytes:
    return _I32.pack(len(body) + 4) + body


def _secret_bytes(secret: int | bytes) -> bytes:
    if isinstance(secret, int):
        return secret.to_bytes(4, "big", signed=secret < 0)
    if not 4 <= len(secret) <= _MAX_SECRET:
        raise ValueError(f"secret key of {len(secret)} bytes (4 to {_MAX_SECRET} allowed)")
    return bytes(secret)


def _formats(formats: Sequence[int]) -> bytes:
    return _U16.pack(len(formats)) + b"".join(_I16.pack(f) for f in formats)


def _values(values: Sequence[bytes | None]) -> bytes:
    out = bytearray(_U16.pack(len(values)))
    for v in values:
        out += _I32.pack(-1) if v is None else _I32.pack(len(v)) + v
    return bytes(out)


def ssl_request() -> bytes:
    return _untyped(_I32.pack(SSL_REQUEST_CODE))


def gssenc_request() -> bytes:
    return _untyped(_I32.pack(GSSENC_REQUEST_CODE))


def cancel_request(pid: int, secret: int | bytes) -> bytes:
    """`secret` as read from `BackendKeyData.secret` (bytes) or a protocol 3.0 int32."""
    return _untyped(_I32.pack(CANCEL_REQUEST_CODE) + _U32.pack(pid) + _secret_bytes(secret))


def startup_message(params: Mapping[str, str], version: int = PROTOCOL_VERSION) -> bytes:
    """`params`: `user` (required by servers), `database`, `application_name`, `options`, ..."""
    body = bytearray(_I32.pack(version))
    for k, v in params.items():
        if not k:
            raise ValueError("startup parameter with an empty name")
        body += _c(k, "startup parameter name") + _c(v, f"startup parameter {k!r}")
    body += b"\0"
    return _untyped(bytes(body))


def password_message(data: bytes) -> bytes:
    """A cleartext password or `md5_password(...)` answer (the NUL terminator is added here)."""
    if b"\0" in data:
        raise ValueError("password contains a NUL byte")
    return encode_message(b"p", data + b"\0")


def sasl_initial_response(mechanism: str, data: bytes | None) -> bytes:
    body = _c(mechanism, "SASL mechanism") + (_I32.pack(-1) if data is None else _I32.pack(len(data)) + data)
    return encode_message(b"p", body)


def sasl_response(data: bytes) -> bytes:
    return encode_message(b"p", data)


def query(sql: str) -> bytes:
    return encode_message(b"Q", _c(sql, "query"))


def parse(statement: str, sql: str, param_types: Sequence[int] = ()) -> bytes:
    body = _c(statement, "statement name", "surrogateescape") + _c(sql, "query")
    body += _U16.pack(len(param_types)) + b"".join(_U32.pack(t) for t in param_types)
    return encode_message(b"P", body)


def bind(
    portal: str,
    statement: str,
    params: Sequence[bytes | None],
    param_formats: Sequence[int] = (),
    result_formats: Sequence[int] = (),
) -> bytes:
    body = _c(portal, "portal name", "surrogateescape") + _c(statement, "statement name", "surrogateescape")
    return encode_message(b"B", body + _formats(param_formats) + _values(params) + _formats(result_formats))


def execute(portal: str = "", max_rows: int = 0) -> bytes:
    return encode_message(b"E", _c(portal, "portal name", "surrogateescape") + _I32.pack(max_rows))


def describe(kind: bytes, name: str = "") -> bytes:
    if kind not in (b"S", b"P"):
        raise ValueError(f"describe kind must be b'S' or b'P', got {kind!r}")
    return encode_message(b"D", kind + _c(name, "name", "surrogateescape"))


def close(kind: bytes, name: str = "") -> bytes:
    if kind not in (b"S", b"P"):
        raise ValueError(f"close kind must be b'S' or b'P', got {kind!r}")
    return encode_message(b"C", kind + _c(name, "name", "surrogateescape"))


def sync() -> bytes:
    return encode_message(b"S")


def flush() -> bytes:
    return encode_message(b"H")


def terminate() -> bytes:
    return encode_message(b"X")


def copy_data(data: bytes) -> bytes:
    return encode_message(b"d", data)


def copy_done() -> bytes:
    return encode_message(b"c")


def copy_fail(reason: str) -> bytes:
    return encode_message(b"f", _c(reason, "CopyFail message"))


def function_call(
    oid: int, args: Sequence[bytes | None], arg_formats: Sequence[int] = (), result_format: int = 0
) -> bytes:
    body = _U32.pack(oid) + _formats(arg_formats) + _values(args) + _I16.pack(result_format)
    return encode_message(b"F", body)


def _fields(severity: str, code: str, text: str, detail: str, hint: str) -> bytes:
    body = bytearray()
    for key, value in (
        ("S", severity),
        ("V", severity),
        ("C", code),
        ("M", text),
        ("D", detail),
        ("H", hint),
    ):
        if value or key in "SVCM":
            body += key.encode() + _c(value, f"field {key}")
    return bytes(body + b"\0")


def error_response(
    message: str, *, code: str = "28000", severity: str = "FATAL", detail: str = "", hint: str = ""
) -> bytes:
    """An error for the client; the default is a FATAL `invalid_authorization_specification`.

    Send it, then close: a FATAL error ends the session as far as the client is concerned.
    """
    return encode_message(b"E", _fields(severity, code, message, detail, hint))


def notice_response(
    message: str, *, code: str = "00000", severity: str = "NOTICE", detail: str = "", hint: str = ""
) -> bytes:
    return encode_message(b"N", _fields(severity, code, message, detail, hint))


def authentication_ok() -> bytes:
    return encode_message(b"R", _I32.pack(AUTH_OK))


def authentication_cleartext() -> bytes:
    return encode_message(b"R", _I32.pack(AUTH_CLEARTEXT))


def authentication_md5(salt: bytes) -> bytes:
    if len(salt) != 4:
        raise ValueError("an MD5 salt is 4 bytes")
    return encode_message(b"R", _I32.pack(AUTH_MD5) + salt)


def authentication_sasl(mechanisms: Sequence[str] = (SCRAM_SHA_256,)) -> bytes:
    body = b"".join(_c(m, "SASL mechanism") for m in mechanisms) + b"\0"
    return encode_message(b"R", _I32.pack(AUTH_SASL) + body)


def authentication_sasl_continue(data: bytes) -> bytes:
    return encode_message(b"R", _I32.pack(AUTH_SASL_CONTINUE) + data)


def authentication_sasl_final(data: bytes) -> bytes:
    return encode_message(b"R", _I32.pack(AUTH_SASL_FINAL) + data)


def parameter_status(name: str, value: str) -> bytes:
    return encode_message(b"S", _c(name, "parameter name") + _c(value, f"parameter {name!r}"))


def backend_key_data(pid: int, secret: int | bytes) -> bytes:
    return encode_message(b"K", _U32.pack(pid) + _secret_bytes(secret))


def ready_for_query(status: bytes = b"I") -> bytes:
    if len(status) != 1 or status not in b"ITE":
        raise ValueError(f"transaction status must be b'I', b'T' or b'E', got {status!r}")
    return encode_message(b"Z", status)


# --------------------------------------------------------------------------------------------
# Upstream authentication


def md5_password(user: str, password: str, salt: bytes) -> bytes:
    """The answer to an MD5 request: `"md5" + md5(md5(password + user) + salt)`, hex digests."""
    inner = hashlib.md5(password.encode() + user.encode(), usedforsecurity=False).hexdigest().encode()
    return b"md5" + hashlib.md5(inner + salt, usedforsecurity=False).hexdigest().encode()


def saslprep(s: str) -> str:
    """RFC 4013 SASLprep for passwords; `ValueError` when the result would be prohibited.

    PostgreSQL (server and libpq) use the password unchanged when SASLprep fails, and so does
    `ScramSha256Client`. Pure ASCII passes through untouched, as in PostgreSQL.
    """
    if s.isascii():
        return s
    mapped = "".join(" " if stringprep.in_table_c12(ch) else ch for ch in s if not stringprep.in_table_b1(ch))
    out = unicodedata.normalize("NFKC", mapped)
    prohibited = (
        stringprep.in_table_c12,
        stringprep.in_table_c21,
        stringprep.in_table_c22,
        stringprep.in_table_c3,
        stringprep.in_table_c4,
        stringprep.in_table_c5,
        stringprep.in_table_c6,
        stringprep.in_table_c7,
        stringprep.in_table_c8,
        stringprep.in_table_c9,
        stringprep.in_table_a1,
    )
    for ch in out:
        if any(table(ch) for table in prohibited):
            raise ValueError(f"SASLprep: prohibited character U+{ord(ch):04X}")
    if any(stringprep.in_table_d1(ch) for ch in out):
        if any(stringprep.in_table_d2(ch) for ch in out):
            raise ValueError("SASLprep: mixes right-to-left and left-to-right characters")
        if not (stringprep.in_table_d1(out[0]) and stringprep.in_table_d1(out[-1])):
            raise ValueError("SASLprep: right-to-left text must start and end with a right-to-left character")
    return out


def _scram_attrs(msg: bytes, what: str) -> list[tuple[str, str]]:
    try:
        text = msg.decode()
    except UnicodeDecodeError:
        raise ProtocolError(f"SCRAM {what} is not UTF-8") from None
    out = []
    for part in text.split(","):
        if len(part) < 2 or part[1] != "=" or not part[0].isalpha():
            raise ProtocolError(f"malformed SCRAM {what}: attribute {part[:20]!r}")
        out.append((part[0], part[2:]))
    return out


def _b64(s: str, what: str) -> bytes:
    try:
        return base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError(f"malformed SCRAM {what}: not base64") from None


class ScramSha256Client:
    """The client side of SCRAM-SHA-256 (RFC 5802/7677) without channel binding (`n,,`).

    `client_first()` → send in `sasl_initial_response(SCRAM_SHA_256, ...)`; the server's
    AuthenticationSASLContinue data → `client_final(...)` → `sasl_response(...)`; the server's
    AuthenticationSASLFinal data → `verify_server_final(...)`, which raises `ProtocolError` unless
    the server proved it knows the password. The PBKDF2 in `client_final` costs the server's
    iteration count (4096 by default, about 2 ms); `max_iterations` bounds what a server may ask.
    """

    def __init__(
        self, user: str, password: str, *, nonce: str | None = None, max_iterations: int = 1_000_000
    ) -> None:
        self.user = user
        try:
            self._password = saslprep(password).encode()
        except ValueError:
            self._password = password.encode()
        self.nonce = nonce if nonce is not None else secrets.token_urlsafe(18)
        if not self.nonce or "," in self.nonce or not self.nonce.isprintable() or not self.nonce.isascii():
            raise ValueError("a SCRAM nonce is printable ASCII without commas")
        self.max_iterations = max_iterations
        self._client_first_bare = ""
        self._server_signature: bytes | None = None
        self.done = False

    def client_first(self) -> bytes:
        name = self.user.replace("=", "=3D").replace(",", "=2C")
        self._client_first_bare = f"n={name},r={self.nonce}"
        return b"n,," + self._client_first_bare.encode()

    def client_final(self, server_first: bytes) -> bytes:
        if not self._client_first_bare:
            raise RuntimeError("client_final() before client_first()")
        if self._server_signature is not None:
            raise RuntimeError("client_final() called twice")
        attrs = _scram_attrs(server_first, "server-first-message")
        if attrs and attrs[0][0] == "m":
            raise ProtocolError("SCRAM server-first-message asks for an unsupported extension")
        if [k for k, _ in attrs[:3]] != ["r", "s", "i"]:
            raise ProtocolError("malformed SCRAM server-first-message: expected r=, s=, i=")
        nonce, salt_b64, iter_s = (v for _, v in attrs[:3])
        if not nonce.startswith(self.nonce) or len(nonce) == len(self.nonce):
            raise ProtocolError("SCRAM server nonce does not extend the client nonce")
        salt = _b64(salt_b64, "salt")
        if not (iter_s.isascii() and iter_s.isdigit()) or not 1 <= int(iter_s) <= self.max_iterations:
            raise ProtocolError(f"SCRAM iteration count {iter_s[:20]!r} outside 1..{self.max_iterations}")
        salted = hashlib.pbkdf2_hmac("sha256", self._password, salt, int(iter_s))
        client_key = hmac.digest(salted, b"Client Key", "sha256")
        stored_key = hashlib.sha256(client_key).digest()
        without_proof = f"c=biws,r={nonce}"
        auth_message = f"{self._client_first_bare},{server_first.decode()},{without_proof}".encode()
        signature = hmac.digest(stored_key, auth_message, "sha256")
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        server_key = hmac.digest(salted, b"Server Key", "sha256")
        self._server_signature = hmac.digest(server_key, auth_message, "sha256")
        return f"{without_proof},p={base64.b64encode(proof).decode()}".encode()

    def verify_server_final(self, server_final: bytes) -> None:
        if self._server_signature is None:
            raise RuntimeError("verify_server_final() before client_final()")
        attrs = _scram_attrs(server_final, "server-final-message")
        key, value = attrs[0]
        if key == "e":
            raise ProtocolError(f"SCRAM authentication failed on the server: {value}")
        if key != "v":
            raise ProtocolError("malformed SCRAM server-final-message: expected v=")
        if not hmac.compare_digest(_b64(value, "server signature"), self._server_signature):
            raise ProtocolError(
                "SCRAM server signature is wrong: the server does not know the password "
                "(or something in between is impersonating it)",
                kind="auth_failed",
            )
        self.done = True


# --------------------------------------------------------------------------------------------
# Audit


_UUID_CUTS = ((0, 8), (8, 12), (12, 16), (16, 20), (20, 32))
_BINARY_FIXED = {  # type OID: (size, how to show the binary value)
    16: (1, lambda b: "true" if b[0] else "false"),  # bool
    21: (2, lambda b: str(_I16.unpack(b)[0])),  # int2
    23: (4, lambda b: str(_I32.unpack(b)[0])),  # int4
    20: (8, lambda b: str(struct.unpack("!q", b)[0])),  # int8
    26: (4, lambda b: str(_U32.unpack(b)[0])),  # oid
    700: (4, lambda b: repr(struct.unpack("!f", b)[0])),  # float4
    701: (8, lambda b: repr(struct.unpack("!d", b)[0])),  # float8
    2950: (16, lambda b: "-".join(b.hex()[i:j] for i, j in _UUID_CUTS)),  # uuid
}
_BINARY_TEXTUAL = {25, 1043, 1042, 19, 114}
"""text, varchar, bpchar, name, json: their binary form is the text itself."""
_OID_JSONB = 3802


def _utf8(data: bytes, truncated: bool) -> str:
    """Decode leniently; when `data` was cut short, drop a multi-byte character cut in two."""
    return codecs.getincrementaldecoder("utf-8")("replace").decode(data, final=not truncated)


def describe_param(value: bytes | None, fmt: int, type_oid: int = 0, *, max_len: int = 256) -> str | None:
    """One parameter for the audit log; see `describe_params`."""
    if value is None:
        return None
    cut = len(value) - max_len
    head = value[:max_len] if cut > 0 else value
    marker = f"…[truncated {cut} bytes]" if cut > 0 else ""
    if fmt == FORMAT_TEXT:
        return _utf8(head, cut > 0) + marker
    if type_oid in _BINARY_FIXED and cut <= 0:
        size, show = _BINARY_FIXED[type_oid]
        if len(value) == size:
            return show(value)
    if type_oid in _BINARY_TEXTUAL:
        return _utf8(head, cut > 0) + marker
    if type_oid == _OID_JSONB and value[:1] == b"\x01":
        return _utf8(head[1:], cut > 0) + marker
    return "\\x" + head.hex() + marker


def describe_params(
    params: Sequence[bytes | None],
    formats: Sequence[int],
    *,
    types: Sequence[int] = (),
    max_len: int = 256,
) -> list[str | None]:
    """Parameters as text for the audit log: None stays None (SQL NULL).

    Text-format values are decoded as UTF-8 (bad bytes become U+FFFD); binary values of a few
    common types (`types`: OIDs from `Parse` or the server's ParameterDescription) are shown as
    their value, others as `\\x` hex. A value longer than `max_len` bytes is cut with a visible
    `…[truncated N bytes]` marker. `formats` follows Bind: none means all text, one applies to all.
    """
    if len(formats) > 1 and len(formats) != len(params):
        raise ProtocolError(f"{len(formats)} parameter formats for {len(params)} parameters")
    out = []
    for i, value in enumerate(params):
        fmt = formats[i] if len(formats) > 1 else (formats[0] if formats else FORMAT_TEXT)
        oid = types[i] if i < len(types) else 0
        out.append(describe_param(value, fmt, oid, max_len=max_len))
    return out


@dataclass(frozen=True, slots=True)
class AuditedQuery:
    """What a `Bind` or `Execute` runs, as far as the tracker can tell.

    `query` is None when the statement's text is unknown: never seen (made with SQL `PREPARE`),
    forgotten to bound memory, closed, or never created. `certain` is False when the text depends
    on whether a `Parse`/`Close` in an earlier pipelined Sync group, not yet answered by the
    server, succeeded.
    """

    event: Literal["bind", "execute"]
    portal: str
    statement: str
    query: str | None
    params: tuple[str | None, ...]
    certain: bool = True
    max_rows: int = 0


@dataclass(slots=True)
class _Statement:
    query: str
    types: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class _Portal:
    statement: str
    query: str | None
    params: tuple[str | None, ...]
    certain: bool


_PARSE, _BIND, _CLOSE, _DESCRIBE, _SIMPLE = b"1", b"2", b"3", b"t", b"Q"
"""Pending operations, named by the server message that confirms them (`Q`: none, a simple query)."""


@dataclass(slots=True)
class _Op:
    reply: bytes
    group: int
    kind: bytes  # b"S" statement or b"P" portal (what `name` names)
    name: str
    statement: _Statement | None = None
    portal: _Portal | None = None

    def touches(self) -> tuple[tuple[bytes, str], ...]:
        if self.reply == _SIMPLE:  # drops the unnamed statement and the unnamed portal
            return ((b"S", ""), (b"P", ""))
        if self.reply == _DESCRIBE:
            return ()
        return ((self.kind, self.name),)


class ExtendedQueryTracker:
    """Remembers prepared statements and portals so that `Bind`/`Execute` are audited with their SQL.

    Feed every client message to `client()` (it returns an `AuditedQuery` for each `Bind` and
    `Execute`) and every server message to `server()`. What the server holds changes only when it
    confirms (ParseComplete, BindComplete, CloseComplete, ParameterDescription), so a `Parse` that
    fails (a syntax error, a name already taken) never stands in for what the server really runs.
    The protocol's rules apply: the server answers in order and an error skips the rest of the
    Sync group, so a `Bind` after a `Parse` of the same name in the same group runs that text or
    not at all; `Parse ""` replaces the unnamed statement; a simple `Query` drops the unnamed
    statement and portal; portals end with the transaction (`ReadyForQuery` status `I`).

    Memory is bounded: at most `max_statements` statements and `max_bytes` of SQL text (least
    recently used go first; a later `Bind` of a forgotten one reports `query=None`), and at most
    `max_pending` unanswered operations. Past that limit, or if the server's answers ever fail to
    match, the tracker goes *blind*: it stops committing and resolves names only within the
    current Sync group, reporting `query=None` otherwise. It never guesses.

    Statements made or dropped with SQL `PREPARE`/`DEALLOCATE`/`DISCARD` are invisible at this
    level; those commands appear in the audited query text themselves.
    """

    def __init__(
        self,
        *,
        max_statements: int = 1000,
        max_bytes: int = 16 << 20,
        max_pending: int = 65536,
        max_param_len: int = 256,
    ) -> None:
        self.max_statements = max_statements
        self.max_bytes = max_bytes
        self.max_pending = max_pending
        self.max_param_len = max_param_len
        self.blind = False
        self._stmts: OrderedDict[str, _Statement] = OrderedDict()
        self._bytes = 0
        self._portals: dict[str, _Portal] = {}
        self._pending: deque[_Op] = deque()
        self._touching: dict[tuple[bytes, str], deque[_Op]] = {}
        self._group = 0  # the Sync group that client messages now belong to
        self._answered = 0  # groups before this one have had their ReadyForQuery

    def statement(self, name: str) -> str | None:
        """The committed text of prepared statement `name`, if known."""
        st = self._stmts.get(name)
        return None if st is None else st.query

    @property
    def pending(self) -> int:
        """Operations sent but not yet answered by the server."""
        return len(self._pending)

    # -- client side

    def client(self, msg: FrontendMessage) -> AuditedQuery | None:
        if isinstance(msg, Parse):
            self._push(
                _Op(
                    _PARSE, self._group, b"S", msg.statement, statement=_Statement(msg.query, msg.param_types)
                )
            )
        elif isinstance(msg, Bind):
            text, types, certain = self._resolve_statement(msg.statement)
            params = describe_params(msg.params, msg.param_formats, types=types, max_len=self.max_param_len)
            portal = _Portal(msg.statement, text, tuple(params), certain)
            self._push(_Op(_BIND, self._group, b"P", msg.portal, portal=portal))
            return AuditedQuery("bind", msg.portal, msg.statement, text, portal.params, certain)
        elif isinstance(msg, Execute):
            p = self._resolve_portal(msg.portal)
            if p is None:
                return AuditedQuery("execute", msg.portal, "", None, (), True, msg.max_rows)
            return AuditedQuery(
                "execute", msg.portal, p.statement, p.query, p.params, p.certain, msg.max_rows
            )
        elif isinstance(msg, Close):
            self._push(_Op(_CLOSE, self._group, msg.kind, msg.name))
        elif isinstance(msg, Describe) and msg.kind == b"S":
            self._push(_Op(_DESCRIBE, self._group, b"S", msg.name))
        elif isinstance(msg, Query):
            # Ends the current group: the server answers a simple query with one ReadyForQuery
            # (shared with any extended messages sent before it without a Sync).
            self._push(_Op(_SIMPLE, self._group, b"S", ""))
            self._end_group()
        elif isinstance(msg, Sync | FunctionCall):
            self._end_group()
        return None

    def _end_group(self) -> None:
        self._group += 1
        if self.blind:
            self._clear_pending()
            self._answered = self._group

    def _push(self, op: _Op) -> None:
        if len(self._pending) >= self.max_pending:
            if self.blind:
                return
            self._go_blind()
        self._pending.append(op)
        for key in op.touches():
            self._touching.setdefault(key, deque()).append(op)

    def _pop(self) -> _Op:
        op = self._pending.popleft()
        for key in op.touches():
            ops = self._touching[key]
            ops.popleft()
            if not ops:
                del self._touching[key]
        return op

    def _latest(self, kind: bytes, name: str) -> tuple[_Op | None, int]:
        ops = self._touching.get((kind, name))
        return (ops[-1], len(ops)) if ops else (None, 0)

    def _resolve_statement(self, name: str) -> tuple[str | None, tuple[int, ...], bool]:
        op, count = self._latest(b"S", name)
        st = None if self.blind else self._stmts.get(name)
        if op is None:
            if st is None:
                return None, (), True
            self._stmts.move_to_end(name)
            return st.query, st.types, True
        text, types = (op.statement.query, op.statement.types) if op.statement else (None, ())
        if op.group == self._group:
            # Earlier in this Sync group: if it fails, the server skips this Bind too.
            return text, types, True
        # From an earlier group still unanswered: if that op failed, what was there before stays.
        return text, types, st is None and count == 1 and op.reply != _CLOSE

    def _resolve_portal(self, name: str) -> _Portal | None:
        op, _ = self._latest(b"P", name)
        if op is None:
            return None if self.blind else self._portals.get(name)
        if op.portal is None:
            return None
        if op.group == self._group:
            return op.portal
        p = op.portal
        return _Portal(p.statement, p.query, p.params, False)

    # -- server side

    def server(self, msg: ServerMessage) -> None:
        if self.blind:
            return
        if isinstance(msg, ReadyForQuery):
            self._ready(msg.status)
            return
        if not isinstance(msg, BackendMessage) or msg.type not in (_PARSE, _BIND, _CLOSE, _DESCRIBE):
            return
        op = self._pending[0] if self._pending else None
        if op is None or op.reply != msg.type or op.group != self._answered:
            self._go_blind()
            return
        self._pop()
        if op.reply == _PARSE:
            assert op.statement is not None
            self._store(op.name, op.statement)
        elif op.reply == _BIND:
            assert op.portal is not None
            self._portals[op.name] = op.portal
        elif op.reply == _CLOSE:
            if op.kind == b"S":
                self._forget(op.name)
            else:
                self._portals.pop(op.name, None)
        else:
            c = _Body(msg.body, "ParameterDescription")
            types = c.oids()
            c.done()
            st = self._stmts.get(op.name)
            if st is not None:
                st.types = types

    def _ready(self, status: bytes) -> None:
        if self._answered >= self._group:
            return  # the ReadyForQuery that ends the startup
        while self._pending and self._pending[0].group == self._answered:
            op = self._pop()  # failed or skipped after an error; a simple query's effects apply now
            if op.reply == _SIMPLE:
                self._forget("")
                self._portals.pop("", None)
        self._answered += 1
        if status == b"I":
            self._portals.clear()

    def _go_blind(self) -> None:
        """Too much pending, or answers that do not fit: forget everything rather than guess."""
        self.blind = True
        self._stmts.clear()
        self._bytes = 0
        self._portals.clear()
        self._clear_pending()

    def _clear_pending(self) -> None:
        self._pending.clear()
        self._touching.clear()

    def _store(self, name: str, st: _Statement) -> None:
        self._forget(name)
        self._stmts[name] = st
        self._bytes += len(st.query)
        while self._stmts and (len(self._stmts) > self.max_statements or self._bytes > self.max_bytes):
            _, old = self._stmts.popitem(last=False)
            self._bytes -= len(old.query)

    def _forget(self, name: str) -> None:
        old = self._stmts.pop(name, None)
        if old is not None:
            self._bytes -= len(old.query)
