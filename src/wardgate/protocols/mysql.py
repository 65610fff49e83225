"""Sans-IO codec for the MySQL/MariaDB client-server protocol, as the database proxy speaks it.

The proxy plays a MySQL *server* toward the client (its own Handshake v10 greeting, the client's
SSLRequest and TLS upgrade, the HandshakeResponse41 whose password it ignores because the client
certificate is the identity), then a MySQL *client* toward the real server (`ClientAuth`), then
relays packets, decoding the client's commands for the audit log (`parse_command`,
`StatementTracker`). Bytes in, values out, no sockets.

Wire facts this module leans on:

- A packet is a 3-byte little-endian length, a 1-byte sequence number and the payload. A payload
  of 0xFFFFFF bytes or more is split; a physical packet of exactly 0xFFFFFF bytes means "more
  follows" (so a payload that is an exact multiple of 0xFFFFFF ends with an empty packet).
- The sequence number restarts at 0 with every command and rises by one per physical packet in
  either direction; a reply uses the sequence after the packet it answers (`Packet.next_seq`).
- Capability flags are 32 bits; MariaDB puts 32 more ("extended capabilities") in filler bytes
  when the `CLIENT_MYSQL` bit is clear. Here they live in bits 32-63 of the same integer.

Parsers never trust a length: every field is bounds-checked and anything that does not fit is a
`ProtocolError`. Strings that decide who or where (user name, schema, plugin name) must be UTF-8;
SQL text is decoded leniently because it only goes to the audit log.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import secrets
import struct
from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from wardgate.protocols.errors import ProtocolError

# --------------------------------------------------------------------------------------------
# Packet framing
# --------------------------------------------------------------------------------------------

MAX_PAYLOAD = 0xFFFFFF
"""Largest payload one physical packet carries; a packet this long is continued by the next."""

MAX_PACKET = 16 * 1024 * 1024
"""Default cap on a reassembled logical packet (the server's default `max_allowed_packet`)."""

HEADER_SIZE = 4


@dataclass(frozen=True, slots=True)
class Packet:
    """One logical packet: `payload` reassembled, `raw` exactly as it came off the wire.

    `seq` is the sequence number of the first physical packet, `last_seq` of the last one
    (they differ only for payloads of 16 MiB or more). Forward `raw` to relay untouched.
    """

    seq: int
    payload: bytes
    raw: bytes
    last_seq: int | None = None

    @property
    def next_seq(self) -> int:
        """The sequence number of the packet that answers or follows this one."""
        return ((self.seq if self.last_seq is None else self.last_seq) + 1) & 0xFF


def encode_packet(seq: int, payload: bytes | bytearray | memoryview) -> bytes:
    """Frame `payload` as wire bytes starting at sequence `seq`; splits payloads >= 16 MiB.

    Each continuation packet takes the next sequence number, so the packet after this one uses
    `seq + packets_for(len(payload))`.
    """
    mv = memoryview(payload).cast("B")
    parts: list[bytes | memoryview] = []
    start = 0
    while True:
        chunk = mv[start : start + MAX_PAYLOAD]
        parts.append(len(chunk).to_bytes(3, "little") + bytes((seq & 0xFF,)))
        parts.append(chunk)
        seq += 1
        start += len(chunk)
        if len(chunk) < MAX_PAYLOAD:
            return b"".join(parts)


def packets_for(payload_len: int) -> int:
    """How many physical packets (hence sequence numbers) a payload of this length takes."""
    return payload_len // MAX_PAYLOAD + 1


class PacketReader:
    """Feed wire bytes in any chunks; get complete logical packets back.

    Sequence numbers are checked inside a multi-packet payload only: across logical packets
    they restart with every command, which only the caller knows about.
    """

    __slots__ = ("_buf", "_first_seq", "_last_seq", "_scan", "_size", "max_packet")

    def __init__(self, max_packet: int = MAX_PACKET) -> None:
        self.max_packet = max_packet
        self._buf = bytearray()
        self._scan = 0  # where the next physical header of the current logical packet starts
        self._size = 0  # payload bytes of the current logical packet seen in complete pieces
        self._first_seq = 0
        self._last_seq = 0

    @property
    def buffered(self) -> int:
        """Bytes held back waiting for the rest of a packet; non-zero at EOF means a cut packet."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Packet]:
        buf = self._buf
        buf += data
        out: list[Packet] = []
        while True:
            pos = self._scan
            if len(buf) - pos < HEADER_SIZE:
                return out
            length = buf[pos] | (buf[pos + 1] << 8) | (buf[pos + 2] << 16)
            seq = buf[pos + 3]
            if pos and seq != (self._last_seq + 1) & 0xFF:
                raise ProtocolError(
                    f"MySQL packet continuation out of order: sequence {seq} after {self._last_seq}",
                    kind="malformed",
                )
            total = self._size + length
            if total > self.max_packet:
                raise ProtocolError(
                    f"MySQL packet of {total}+ bytes exceeds the {self.max_packet}-byte limit",
                    kind="oversized",
                )
            end = pos + HEADER_SIZE + length
            if end > len(buf):
                return out
            if pos == 0:
                self._first_seq = seq
            self._last_seq = seq
            self._scan = end
            self._size = total
            if length == MAX_PAYLOAD:
                continue
            raw = bytes(buf[:end])
            payload = raw[HEADER_SIZE:] if end == HEADER_SIZE + length else _join_payload(raw)
            del buf[:end]
            out.append(Packet(self._first_seq, payload, raw, self._last_seq))
            self._scan = 0
            self._size = 0


def _join_payload(raw: bytes) -> bytes:
    pieces = []
    p = 0
    while p < len(raw):
        n = raw[p] | (raw[p + 1] << 8) | (raw[p + 2] << 16)
        pieces.append(raw[p + HEADER_SIZE : p + HEADER_SIZE + n])
        p += HEADER_SIZE + n
    return b"".join(pieces)


# --------------------------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------------------------

CLIENT_LONG_PASSWORD = 1 << 0
CLIENT_MYSQL = CLIENT_LONG_PASSWORD
"""MariaDB's name for bit 0: clear in its greeting when extended capabilities are present."""
CLIENT_FOUND_ROWS = 1 << 1
CLIENT_LONG_FLAG = 1 << 2
CLIENT_CONNECT_WITH_DB = 1 << 3
CLIENT_NO_SCHEMA = 1 << 4
CLIENT_COMPRESS = 1 << 5
CLIENT_ODBC = 1 << 6
CLIENT_LOCAL_FILES = 1 << 7
CLIENT_IGNORE_SPACE = 1 << 8
CLIENT_PROTOCOL_41 = 1 << 9
CLIENT_INTERACTIVE = 1 << 10
CLIENT_SSL = 1 << 11
CLIENT_IGNORE_SIGPIPE = 1 << 12
CLIENT_TRANSACTIONS = 1 << 13
CLIENT_RESERVED = 1 << 14
CLIENT_SECURE_CONNECTION = 1 << 15
CLIENT_MULTI_STATEMENTS = 1 << 16
CLIENT_MULTI_RESULTS = 1 << 17
CLIENT_PS_MULTI_RESULTS = 1 << 18
CLIENT_PLUGIN_AUTH = 1 << 19
CLIENT_CONNECT_ATTRS = 1 << 20
CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA = 1 << 21
CLIENT_CAN_HANDLE_EXPIRED_PASSWORDS = 1 << 22
CLIENT_SESSION_TRACK = 1 << 23
CLIENT_DEPRECATE_EOF = 1 << 24
CLIENT_OPTIONAL_RESULTSET_METADATA = 1 << 25
CLIENT_ZSTD_COMPRESSION_ALGORITHM = 1 << 26
CLIENT_QUERY_ATTRIBUTES = 1 << 27
CLIENT_MULTI_FACTOR_AUTHENTICATION = 1 << 28
CLIENT_CAPABILITY_EXTENSION = 1 << 29
CLIENT_SSL_VERIFY_SERVER_CERT = 1 << 30
CLIENT_REMEMBER_OPTIONS = 1 << 31
# MariaDB extended capabilities (sent in filler bytes, kept here as bits 32-63).
MARIADB_CLIENT_PROGRESS = 1 << 32
MARIADB_CLIENT_COM_MULTI = 1 << 33
MARIADB_CLIENT_STMT_BULK_OPERATIONS = 1 << 34
MARIADB_CLIENT_EXTENDED_METADATA = 1 << 35
MARIADB_CLIENT_CACHE_METADATA = 1 << 36

DEFAULT_CLIENT_CAPABILITIES = (
    CLIENT_LONG_PASSWORD
    | CLIENT_LONG_FLAG
    | CLIENT_PROTOCOL_41
    | CLIENT_TRANSACTIONS
    | CLIENT_SECURE_CONNECTION
    | CLIENT_MULTI_STATEMENTS
    | CLIENT_MULTI_RESULTS
    | CLIENT_PS_MULTI_RESULTS
    | CLIENT_PLUGIN_AUTH
    | CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA
    | CLIENT_CONNECT_ATTRS
    | CLIENT_DEPRECATE_EOF
)
"""What `ClientAuth` asks for unless told otherwise (always intersected with the server's)."""

DEFAULT_SERVER_CAPABILITIES = (
    DEFAULT_CLIENT_CAPABILITIES
    | CLIENT_FOUND_ROWS
    | CLIENT_CONNECT_WITH_DB
    | CLIENT_IGNORE_SPACE
    | CLIENT_INTERACTIVE
    | CLIENT_SSL
    | CLIENT_SESSION_TRACK
)
"""A greeting's capabilities that MySQL 5.7+ and MariaDB 10.2+ upstreams can all honour."""

SERVER_STATUS_IN_TRANS = 0x0001
SERVER_STATUS_AUTOCOMMIT = 0x0002
SERVER_MORE_RESULTS_EXISTS = 0x0008
SERVER_SESSION_STATE_CHANGED = 0x4000

# Errors the proxy sends itself (code, SQLSTATE), as the `mysql` client knows them.
ER_DBACCESS_DENIED_ERROR = 1044  # "42000": Access denied for user ... to database ...
ER_ACCESS_DENIED_ERROR = 1045  # "28000": Access denied for user ...
ER_UNKNOWN_COM_ERROR = 1047  # "08S01": Unknown command
ER_NOT_SUPPORTED_YET = 1235  # "42000": This version of ... doesn't yet support ...
SQLSTATE_ACCESS_DENIED = "28000"

UTF8MB4_GENERAL_CI = 45
"""Collation id both MySQL and MariaDB know; the default `charset` here."""

NATIVE_PASSWORD = "mysql_native_password"  # noqa: S105 - a plugin name
CACHING_SHA2_PASSWORD = "caching_sha2_password"  # noqa: S105 - a plugin name
SHA256_PASSWORD = "sha256_password"  # noqa: S105 - a plugin name
CLEAR_PASSWORD = "mysql_clear_password"  # noqa: S105 - a plugin name

CACHING_SHA2_REQUEST_PUBLIC_KEY = 0x02
CACHING_SHA2_FAST_AUTH_SUCCESS = 0x03
CACHING_SHA2_PERFORM_FULL_AUTH = 0x04
SHA256_REQUEST_PUBLIC_KEY = 0x01

NONCE_LEN = 20

COM_SLEEP = 0x00
COM_QUIT = 0x01
COM_INIT_DB = 0x02
COM_QUERY = 0x03
COM_FIELD_LIST = 0x04
COM_CREATE_DB = 0x05
COM_DROP_DB = 0x06
COM_REFRESH = 0x07
COM_SHUTDOWN = 0x08
COM_STATISTICS = 0x09
COM_PROCESS_INFO = 0x0A
COM_CONNECT = 0x0B
COM_PROCESS_KILL = 0x0C
COM_DEBUG = 0x0D
COM_PING = 0x0E
COM_TIME = 0x0F
COM_DELAYED_INSERT = 0x10
COM_CHANGE_USER = 0x11
COM_BINLOG_DUMP = 0x12
COM_TABLE_DUMP = 0x13
COM_CONNECT_OUT = 0x14
COM_REGISTER_SLAVE = 0x15
COM_STMT_PREPARE = 0x16
COM_STMT_EXECUTE = 0x17
COM_STMT_SEND_LONG_DATA = 0x18
COM_STMT_CLOSE = 0x19
COM_STMT_RESET = 0x1A
COM_SET_OPTION = 0x1B
COM_STMT_FETCH = 0x1C
COM_DAEMON = 0x1D
COM_BINLOG_DUMP_GTID = 0x1E
COM_RESET_CONNECTION = 0x1F
COM_CLONE = 0x20
COM_STMT_BULK_EXECUTE = 0xFA  # MariaDB

COMMAND_NAMES = {
    value: name for name, value in globals().items() if name.startswith("COM_") and isinstance(value, int)
}
"""Command code -> constant name (`3` -> `"COM_QUERY"`), for audit events and messages."""

# COM_STMT_EXECUTE flags.
CURSOR_TYPE_READ_ONLY = 0x01
CURSOR_TYPE_FOR_UPDATE = 0x02
CURSOR_TYPE_SCROLLABLE = 0x04
PARAMETER_COUNT_AVAILABLE = 0x08

STMT_ID_LAST_PREPARED = 0xFFFFFFFF
"""MariaDB: a COM_STMT_EXECUTE with this id runs the most recently prepared statement."""

TYPE_DECIMAL = 0
TYPE_TINY = 1
TYPE_SHORT = 2
TYPE_LONG = 3
TYPE_FLOAT = 4
TYPE_DOUBLE = 5
TYPE_NULL = 6
TYPE_TIMESTAMP = 7
TYPE_LONGLONG = 8
TYPE_INT24 = 9
TYPE_DATE = 10
TYPE_TIME = 11
TYPE_DATETIME = 12
TYPE_YEAR = 13
TYPE_NEWDATE = 14
TYPE_VARCHAR = 15
TYPE_BIT = 16
TYPE_VECTOR = 242
TYPE_JSON = 245
TYPE_NEWDECIMAL = 246
TYPE_ENUM = 247
TYPE_SET = 248
TYPE_TINY_BLOB = 249
TYPE_MEDIUM_BLOB = 250
TYPE_LONG_BLOB = 251
TYPE_BLOB = 252
TYPE_VAR_STRING = 253
TYPE_STRING = 254
TYPE_GEOMETRY = 255

PARAM_FLAG_UNSIGNED = 0x80

_TEXT_TYPES = frozenset({TYPE_VARCHAR, TYPE_VAR_STRING, TYPE_STRING, TYPE_ENUM, TYPE_SET, TYPE_JSON})
_BYTES_TYPES = frozenset(
    {TYPE_TINY_BLOB, TYPE_MEDIUM_BLOB, TYPE_LONG_BLOB, TYPE_BLOB, TYPE_GEOMETRY, TYPE_BIT, TYPE_VECTOR}
)
_DECIMAL_TYPES = frozenset({TYPE_DECIMAL, TYPE_NEWDECIMAL})
_INT_SIZES = {TYPE_TINY: 1, TYPE_SHORT: 2, TYPE_YEAR: 2, TYPE_LONG: 4, TYPE_INT24: 4, TYPE_LONGLONG: 8}
_DATE_TYPES = frozenset({TYPE_DATE, TYPE_DATETIME, TYPE_TIMESTAMP, TYPE_NEWDATE})

MAX_PARAMS = 0xFFFF
"""Most placeholders a statement may have (the count is 16 bits in COM_STMT_PREPARE_OK)."""

# --------------------------------------------------------------------------------------------
# Basic types: a bounds-checked reader and the length-encoded writers
# --------------------------------------------------------------------------------------------


class _Reader:
    """Reads fields off one payload; running past the end is a `ProtocolError` naming the field."""

    __slots__ = ("buf", "end", "pos", "what")

    def __init__(self, data: bytes | bytearray | memoryview, what: str, pos: int = 0) -> None:
        self.buf = bytes(data)
        self.pos = pos
        self.end = len(self.buf)
        self.what = what

    @property
    def remaining(self) -> int:
        return self.end - self.pos

    def error(self, problem: str) -> ProtocolError:
        return ProtocolError(f"malformed {self.what}: {problem}", kind="malformed")

    def take(self, n: int, name: str) -> bytes:
        if n < 0 or n > self.end - self.pos:
            raise self.error(f"{name} runs past the end of the packet")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def int(self, n: int, name: str) -> int:
        return int.from_bytes(self.take(n, name), "little")

    def u8(self, name: str) -> int:
        if self.pos >= self.end:
            raise self.error(f"{name} runs past the end of the packet")
        self.pos += 1
        return self.buf[self.pos - 1]

    def lenenc_int(self, name: str) -> int:
        first = self.u8(name)
        if first < 0xFB:
            return first
        if first == 0xFC:
            return self.int(2, name)
        if first == 0xFD:
            return self.int(3, name)
        if first == 0xFE:
            return self.int(8, name)
        raise self.error(f"{name} starts with 0x{first:02x}, which is not a length-encoded integer")

    def lenenc_bytes(self, name: str) -> bytes:
        return self.take(self.lenenc_int(name), name)

    def nul_bytes(self, name: str, *, eof_ok: bool = False) -> bytes:
        """A NUL-terminated string; with `eof_ok` the end of the packet also terminates it."""
        nul = self.buf.find(b"\0", self.pos, self.end)
        if nul < 0:
            if not eof_ok:
                raise self.error(f"{name} is not NUL-terminated")
            nul = self.end
        out = self.buf[self.pos : nul]
        self.pos = min(nul + 1, self.end)
        return out

    def rest(self) -> bytes:
        out = self.buf[self.pos : self.end]
        self.pos = self.end
        return out

    def text(self, raw: bytes, name: str) -> str:
        """Strict UTF-8: for names that decide identity or routing."""
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.error(f"{name} is not valid UTF-8") from e


def write_lenenc_int(n: int) -> bytes:
    """Length-encoded integer: 1, 3, 4 or 9 bytes."""
    if n < 0:
        raise ValueError(f"length-encoded integer must be non-negative, got {n}")
    if n < 0xFB:
        return bytes((n,))
    if n < 1 << 16:
        return b"\xfc" + n.to_bytes(2, "little")
    if n < 1 << 24:
        return b"\xfd" + n.to_bytes(3, "little")
    if n < 1 << 64:
        return b"\xfe" + n.to_bytes(8, "little")
    raise ValueError(f"length-encoded integer must be below 2**64, got {n}")


def read_lenenc_int(data: bytes | bytearray | memoryview, pos: int = 0) -> tuple[int, int]:
    """Read a length-encoded integer at `pos`; return `(value, position after it)`."""
    r = _Reader(data, "length-encoded integer", pos)
    return r.lenenc_int("value"), r.pos


def write_lenenc_str(data: bytes | str) -> bytes:
    raw = data.encode() if isinstance(data, str) else bytes(data)
    return write_lenenc_int(len(raw)) + raw


def read_lenenc_str(data: bytes | bytearray | memoryview, pos: int = 0) -> tuple[bytes, int]:
    """Read a length-encoded string at `pos`; return `(bytes, position after it)`."""
    r = _Reader(data, "length-encoded string", pos)
    return r.lenenc_bytes("value"), r.pos


def _nul(s: str | bytes) -> bytes:
    raw = s.encode() if isinstance(s, str) else s
    if b"\0" in raw:
        raise ValueError(f"{s!r} contains a NUL byte")
    return raw + b"\0"


def _split_caps(caps: int) -> tuple[int, int]:
    """(low 32 bits, MariaDB extended bits); extended bits require CLIENT_MYSQL to be clear."""
    ext = caps >> 32
    if ext and caps & CLIENT_MYSQL:
        raise ValueError("MariaDB extended capabilities need the CLIENT_MYSQL bit clear")
    if ext >> 32:
        raise ValueError("capabilities do not fit in 64 bits")
    return caps & 0xFFFFFFFF, ext


def new_nonce(n: int = NONCE_LEN) -> bytes:
    """A greeting scramble like MySQL's own: printable ASCII without `$` (some clients choke on NUL)."""
    alphabet = bytes(c for c in range(0x21, 0x7F) if c != 0x24)
    return bytes(secrets.choice(alphabet) for _ in range(n))


# --------------------------------------------------------------------------------------------
# Generic response packets
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OkPacket:
    affected_rows: int = 0
    last_insert_id: int = 0
    status: int = SERVER_STATUS_AUTOCOMMIT
    warnings: int = 0
    info: str = ""

    @classmethod
    def parse(cls, payload: bytes, capabilities: int = CLIENT_PROTOCOL_41) -> OkPacket:
        r = _Reader(payload, "OK packet")
        header = r.u8("header")
        if header not in (0x00, 0xFE):
            raise r.error(f"header 0x{header:02x} is not 0x00 or 0xfe")
        affected = r.lenenc_int("affected_rows")
        last_id = r.lenenc_int("last_insert_id")
        status = warnings = 0
        if capabilities & CLIENT_PROTOCOL_41:
            status = r.int(2, "status_flags")
            warnings = r.int(2, "warnings")
        elif capabilities & CLIENT_TRANSACTIONS:
            status = r.int(2, "status_flags")
        if capabilities & CLIENT_SESSION_TRACK:
            info = r.lenenc_bytes("info") if r.remaining else b""
        else:
            info = r.rest()
        return cls(affected, last_id, status, warnings, info.decode("utf-8", "replace"))

    def encode(self, capabilities: int = CLIENT_PROTOCOL_41) -> bytes:
        out = bytearray(b"\x00")
        out += write_lenenc_int(self.affected_rows)
        out += write_lenenc_int(self.last_insert_id)
        out += struct.pack("<HH", self.status, self.warnings)
        if self.info:
            info = self.info.encode()
            out += write_lenenc_str(info) if capabilities & CLIENT_SESSION_TRACK else info
        return bytes(out)


@dataclass(frozen=True, slots=True)
class ErrPacket:
    """An error the server reports; the `mysql` client prints `ERROR code (sqlstate): message`."""

    code: int
    sqlstate: str
    message: str

    @classmethod
    def parse(cls, payload: bytes) -> ErrPacket:
        r = _Reader(payload, "ERR packet")
        header = r.u8("header")
        if header != 0xFF:
            raise r.error(f"header 0x{header:02x} is not 0xff")
        code = r.int(2, "error code")
        sqlstate = "HY000"
        # Errors sent before capabilities are agreed (e.g. instead of the greeting) have no state.
        if r.remaining >= 6 and r.buf[r.pos] == 0x23:  # '#'
            r.pos += 1
            sqlstate = r.take(5, "sqlstate").decode("ascii", "replace")
        return cls(code, sqlstate, r.rest().decode("utf-8", "replace"))

    def encode(self) -> bytes:
        state = self.sqlstate.encode("ascii")
        if len(state) != 5:
            raise ValueError(f"sqlstate must be 5 ASCII characters, got {self.sqlstate!r}")
        return b"\xff" + struct.pack("<H", self.code) + b"#" + state + self.message.encode()

    def __str__(self) -> str:
        return f"ERROR {self.code} ({self.sqlstate}): {self.message}"


@dataclass(frozen=True, slots=True)
class EofPacket:
    warnings: int = 0
    status: int = SERVER_STATUS_AUTOCOMMIT

    @classmethod
    def parse(cls, payload: bytes) -> EofPacket:
        if not is_eof(payload):
            raise ProtocolError("malformed EOF packet: not 0xfe with fewer than 9 bytes", kind="malformed")
        r = _Reader(payload, "EOF packet", 1)
        if r.remaining < 4:
            return cls(0, 0)
        return cls(r.int(2, "warnings"), r.int(2, "status_flags"))

    def encode(self) -> bytes:
        return b"\xfe" + struct.pack("<HH", self.warnings, self.status)


def is_ok(payload: bytes) -> bool:
    return len(payload) >= 7 and payload[0] == 0x00


def is_err(payload: bytes) -> bool:
    return len(payload) >= 3 and payload[0] == 0xFF


def is_eof(payload: bytes) -> bool:
    """An EOF packet (0xfe, < 9 bytes). In the auth phase a 0xfe packet is an AuthSwitchRequest."""
    return 0 < len(payload) < 9 and payload[0] == 0xFE


def is_auth_switch(payload: bytes) -> bool:
    """In the auth phase only: 0xfe starts an AuthSwitchRequest (a lone 0xfe is the pre-4.1 one)."""
    return len(payload) >= 1 and payload[0] == 0xFE


def is_auth_more_data(payload: bytes) -> bool:
    """In the auth phase only: 0x01 starts AuthMoreData."""
    return len(payload) >= 1 and payload[0] == 0x01


def ok_packet(
    seq: int,
    affected_rows: int = 0,
    last_insert_id: int = 0,
    status: int = SERVER_STATUS_AUTOCOMMIT,
    warnings: int = 0,
    info: str = "",
    *,
    capabilities: int = CLIENT_PROTOCOL_41,
) -> bytes:
    """A framed OK packet (wire bytes)."""
    return encode_packet(
        seq, OkPacket(affected_rows, last_insert_id, status, warnings, info).encode(capabilities)
    )


def err_packet(seq: int, code: int, sqlstate: str, message: str) -> bytes:
    """A framed ERR packet, e.g. `err_packet(2, 1045, "28000", "Access denied for user 'bob'")`."""
    return encode_packet(seq, ErrPacket(code, sqlstate, message).encode())


def eof_packet(seq: int, warnings: int = 0, status: int = SERVER_STATUS_AUTOCOMMIT) -> bytes:
    """A framed EOF packet (for clients without CLIENT_DEPRECATE_EOF)."""
    return encode_packet(seq, EofPacket(warnings, status).encode())


# --------------------------------------------------------------------------------------------
# Connection phase
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HandshakeV10:
    """The server's greeting. `auth_plugin_data` is the whole nonce (20 bytes, no trailing NUL)."""

    server_version: str
    connection_id: int
    auth_plugin_data: bytes
    capabilities: int = DEFAULT_SERVER_CAPABILITIES
    charset: int = UTF8MB4_GENERAL_CI
    status: int = SERVER_STATUS_AUTOCOMMIT
    auth_plugin_name: str = NATIVE_PASSWORD

    @classmethod
    def parse(cls, payload: bytes) -> HandshakeV10:
        r = _Reader(payload, "HandshakeV10")
        version = r.u8("protocol version")
        if version == 0xFF:
            err = ErrPacket.parse(payload)
            raise ProtocolError(f"server refused the connection: {err}", kind="server_error")
        if version != 10:
            raise ProtocolError(
                f"unsupported MySQL protocol version {version} (only 10 is spoken)", kind="unsupported"
            )
        server_version = r.nul_bytes("server version").decode("utf-8", "replace")
        conn_id = r.int(4, "connection id")
        nonce = r.take(8, "auth-plugin-data-part-1")
        r.u8("filler")
        caps = r.int(2, "capability flags")
        charset, status, auth_len = 0, 0, 0
        if r.remaining:
            charset = r.u8("character set")
            status = r.int(2, "status flags")
            caps |= r.int(2, "capability flags (upper)") << 16
            auth_len = r.u8("auth-plugin-data length")
            reserved = r.take(10, "reserved")
            if not caps & CLIENT_MYSQL:
                caps |= int.from_bytes(reserved[6:], "little") << 32
            if caps & CLIENT_SECURE_CONNECTION:
                part2 = r.take(max(13, auth_len - 8), "auth-plugin-data-part-2")
                nonce += part2[:-1] if part2.endswith(b"\0") else part2
        plugin = ""
        if caps & CLIENT_PLUGIN_AUTH:
            # Some servers omit the terminating NUL of the last field.
            plugin = r.text(r.nul_bytes("auth plugin name", eof_ok=True), "auth plugin name")
        return cls(server_version, conn_id, nonce, caps, charset, status, plugin)

    def encode(self) -> bytes:
        if len(self.auth_plugin_data) < 8:
            raise ValueError("auth_plugin_data must be at least 8 bytes")
        low, ext = _split_caps(self.capabilities)
        data = self.auth_plugin_data
        out = bytearray(b"\x0a")
        out += _nul(self.server_version)
        out += struct.pack("<I", self.connection_id)
        out += data[:8] + b"\0"
        out += struct.pack("<HBHH", low & 0xFFFF, self.charset, self.status, low >> 16)
        out.append(len(data) + 1 if low & CLIENT_PLUGIN_AUTH else 0)
        out += bytes(6) + struct.pack("<I", ext)
        if low & CLIENT_SECURE_CONNECTION:
            part2 = data[8:] + b"\0"
            out += part2.ljust(13, b"\0")
        if low & CLIENT_PLUGIN_AUTH:
            out += _nul(self.auth_plugin_name)
        return bytes(out)


@dataclass(frozen=True, slots=True)
class SSLRequest:
    """The 32-byte prefix of a HandshakeResponse41 a client sends before starting TLS."""

    capabilities: int
    max_packet: int = MAX_PACKET
    charset: int = UTF8MB4_GENERAL_CI

    SIZE: ClassVar[int] = 32

    @classmethod
    def parse(cls, payload: bytes) -> SSLRequest:
        r = _Reader(payload, "SSLRequest")
        caps, max_packet, charset, _ = _read_response_prefix(r)
        if r.remaining:
            raise r.error(f"{r.remaining} bytes after the 32-byte request")
        if not caps & CLIENT_SSL:
            raise r.error("CLIENT_SSL is not set")
        return cls(caps, max_packet, charset)

    def encode(self) -> bytes:
        return _encode_response_prefix(self.capabilities | CLIENT_SSL, self.max_packet, self.charset)


def _read_response_prefix(r: _Reader) -> tuple[int, int, int, bytes]:
    caps = r.int(4, "capability flags")
    if not caps & CLIENT_PROTOCOL_41:
        raise ProtocolError(
            "client speaks the pre-4.1 protocol (CLIENT_PROTOCOL_41 not set), which is not supported",
            kind="unsupported",
        )
    max_packet = r.int(4, "max packet size")
    charset = r.u8("character set")
    filler = r.take(23, "filler")
    if not caps & CLIENT_MYSQL:
        caps |= int.from_bytes(filler[19:], "little") << 32
    return caps, max_packet, charset, filler


def _encode_response_prefix(caps: int, max_packet: int, charset: int) -> bytes:
    low, ext = _split_caps(caps | CLIENT_PROTOCOL_41)
    return struct.pack("<IIB", low, max_packet, charset) + bytes(19) + struct.pack("<I", ext)


@dataclass(frozen=True, slots=True)
class HandshakeResponse41:
    """The client's login. Which optional fields are on the wire follows `capabilities`."""

    capabilities: int
    username: str
    auth_response: bytes = b""
    database: str | None = None
    auth_plugin_name: str | None = None
    connect_attrs: dict[str, str] = field(default_factory=dict)
    max_packet: int = MAX_PACKET
    charset: int = UTF8MB4_GENERAL_CI

    @classmethod
    def parse(cls, payload: bytes) -> HandshakeResponse41:
        r = _Reader(payload, "HandshakeResponse41")
        caps, max_packet, charset, _ = _read_response_prefix(r)
        username = r.text(r.nul_bytes("username"), "username")
        if caps & CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA:
            auth = r.lenenc_bytes("auth response")
        elif caps & CLIENT_SECURE_CONNECTION:
            auth = r.take(r.u8("auth response length"), "auth response")
        else:
            auth = r.nul_bytes("auth response", eof_ok=True)
        # Trailing optional fields: tolerate a client that sets the flag but stops early.
        database = None
        if caps & CLIENT_CONNECT_WITH_DB and r.remaining:
            database = r.text(r.nul_bytes("database", eof_ok=True), "database")
        plugin = None
        if caps & CLIENT_PLUGIN_AUTH and r.remaining:
            plugin = r.text(r.nul_bytes("auth plugin name", eof_ok=True), "auth plugin name")
        attrs: dict[str, str] = {}
        if caps & CLIENT_CONNECT_ATTRS and r.remaining:
            sub = _Reader(r.lenenc_bytes("connect attributes"), "HandshakeResponse41 connect attributes")
            while sub.remaining:
                key = sub.lenenc_bytes("attribute name").decode("utf-8", "replace")
                attrs[key] = sub.lenenc_bytes("attribute value").decode("utf-8", "replace")
        # CLIENT_ZSTD_COMPRESSION_ALGORITHM adds a level byte here; nothing after matters to us.
        return cls(caps, username, auth, database, plugin, attrs, max_packet, charset)

    def encode(self) -> bytes:
        caps = self.capabilities
        out = bytearray(_encode_response_prefix(caps, self.max_packet, self.charset))
        out += _nul(self.username)
        if caps & CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA:
            out += write_lenenc_str(self.auth_response)
        elif caps & CLIENT_SECURE_CONNECTION:
            if len(self.auth_response) > 255:
                raise ValueError("auth response over 255 bytes needs CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA")
            out.append(len(self.auth_response))
            out += self.auth_response
        else:
            out += _nul(self.auth_response)
        if caps & CLIENT_CONNECT_WITH_DB:
            out += _nul(self.database or "")
        if caps & CLIENT_PLUGIN_AUTH:
            out += _nul(self.auth_plugin_name or "")
        if caps & CLIENT_CONNECT_ATTRS:
            attrs = b"".join(write_lenenc_str(k) + write_lenenc_str(v) for k, v in self.connect_attrs.items())
            out += write_lenenc_str(attrs)
        return bytes(out)


def parse_client_handshake(payload: bytes) -> SSLRequest | HandshakeResponse41:
    """What a client sends after the greeting: an SSLRequest (32 bytes, CLIENT_SSL) or its login."""
    if len(payload) == SSLRequest.SIZE:
        return SSLRequest.parse(payload)
    return HandshakeResponse41.parse(payload)


@dataclass(frozen=True, slots=True)
class AuthSwitchRequest:
    """Server: "use this plugin with this data". `data` is as sent (often nonce + NUL)."""

    plugin: str
    data: bytes = b""

    @classmethod
    def parse(cls, payload: bytes) -> AuthSwitchRequest:
        r = _Reader(payload, "AuthSwitchRequest")
        if r.u8("header") != 0xFE:
            raise r.error("header is not 0xfe")
        if not r.remaining:
            # The pre-4.1 "old password" switch: no plugin name at all.
            return cls("mysql_old_password", b"")
        plugin = r.text(r.nul_bytes("plugin name", eof_ok=True), "plugin name")
        return cls(plugin, r.rest())

    def encode(self) -> bytes:
        return b"\xfe" + _nul(self.plugin) + self.data

    @property
    def nonce(self) -> bytes:
        """`data` without its trailing NUL: the scramble the password plugins hash with."""
        return self.data[:-1] if self.data.endswith(b"\0") else self.data


@dataclass(frozen=True, slots=True)
class AuthMoreData:
    """0x01 + plugin-specific data (caching_sha2: a 0x03/0x04 marker, or the server's RSA key)."""

    data: bytes

    @classmethod
    def parse(cls, payload: bytes) -> AuthMoreData:
        if not is_auth_more_data(payload):
            raise ProtocolError("malformed AuthMoreData: header is not 0x01", kind="malformed")
        return cls(bytes(payload[1:]))

    def encode(self) -> bytes:
        return b"\x01" + self.data


AuthReply = OkPacket | ErrPacket | AuthSwitchRequest | AuthMoreData


def parse_auth_reply(payload: bytes, capabilities: int = CLIENT_PROTOCOL_41) -> AuthReply:
    """Tell apart what a server may send after a HandshakeResponse41 or an auth round trip."""
    if not payload:
        raise ProtocolError("malformed auth reply: empty packet", kind="malformed")
    head = payload[0]
    if head == 0x00:
        return OkPacket.parse(payload, capabilities)
    if head == 0xFF:
        return ErrPacket.parse(payload)
    if head == 0xFE:
        return AuthSwitchRequest.parse(payload)
    if head == 0x01:
        return AuthMoreData.parse(payload)
    raise ProtocolError(f"malformed auth reply: unexpected packet type 0x{head:02x}", kind="malformed")


# --------------------------------------------------------------------------------------------
# Auth math
# --------------------------------------------------------------------------------------------


def _pw(password: str | bytes | None) -> bytes:
    if password is None:
        return b""
    return password.encode() if isinstance(password, str) else bytes(password)


def _xor(data: bytes, key: bytes) -> bytes:
    if not key:
        raise ValueError("empty key")
    return bytes(b ^ key[i % len(key)] for i, b in enumerate(data))


def native_password_scramble(password: str | bytes | None, nonce: bytes) -> bytes:
    """mysql_native_password: SHA1(pw) XOR SHA1(nonce + SHA1(SHA1(pw))); empty for no password."""
    pw = _pw(password)
    if not pw:
        return b""
    h1 = hashlib.sha1(pw).digest()  # noqa: S324 - the protocol's choice, not ours
    h2 = hashlib.sha1(h1).digest()  # noqa: S324
    h3 = hashlib.sha1(nonce[:NONCE_LEN] + h2).digest()  # noqa: S324
    return bytes(a ^ b for a, b in zip(h1, h3, strict=True))


def caching_sha2_scramble(password: str | bytes | None, nonce: bytes) -> bytes:
    """caching_sha2_password fast auth: SHA256(pw) XOR SHA256(SHA256(SHA256(pw)) + nonce)."""
    pw = _pw(password)
    if not pw:
        return b""
    h1 = hashlib.sha256(pw).digest()
    h2 = hashlib.sha256(h1).digest()
    h3 = hashlib.sha256(h2 + nonce[:NONCE_LEN]).digest()
    return bytes(a ^ b for a, b in zip(h1, h3, strict=True))


def caching_sha2_rsa_encrypt(password: str | bytes | None, nonce: bytes, public_key_pem: bytes) -> bytes:
    """Full auth without TLS: RSA-OAEP(SHA1) of (password + NUL) XOR nonce, with the server's key."""
    try:
        key = serialization.load_pem_public_key(bytes(public_key_pem).rstrip(b"\0"))
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise ProtocolError("server sent an unreadable RSA public key", kind="malformed") from e
    if not isinstance(key, rsa.RSAPublicKey):
        raise ProtocolError("server's public key is not an RSA key", kind="malformed")
    plain = _xor(_pw(password) + b"\0", nonce[:NONCE_LEN])
    try:
        # The server decrypts with RSA_PKCS1_OAEP_PADDING, whose hash is SHA-1.
        sha1 = hashes.SHA1()  # noqa: S303
        return key.encrypt(plain, padding.OAEP(mgf=padding.MGF1(algorithm=sha1), algorithm=sha1, label=None))
    except ValueError as e:  # password too long for the key
        raise ProtocolError(f"cannot RSA-encrypt the password: {e}", kind="unsupported") from e


# --------------------------------------------------------------------------------------------
# Upstream authentication (the proxy as a MySQL client)
# --------------------------------------------------------------------------------------------


class ClientAuth:
    """Log in to a MySQL/MariaDB server; sans-IO, one server packet in, wire bytes out.

    ::

        auth = ClientAuth("alice", "pw", "shop", ssl=True)
        for pkt in reader.feed(data):          # greeting, then the server's auth replies
            out = auth.receive(pkt)            # bytes to send (maybe b"")
            if auth.state == "tls":            # the SSLRequest is in `out`: send it,
                ...                            # wrap the socket in TLS, then
                out = auth.tls_established()   # send the login
        auth.done / auth.error (an ErrPacket: the server's code and message)

    `on_greeting(HandshakeV10)` is the same first step for a caller that parsed the greeting.
    States: greeting -> (tls ->) auth -> done | failed. A server that breaks the protocol raises
    `ProtocolError`; a server that says no sets `error` and the state `failed`.
    """

    MAX_ROUND_TRIPS = 8

    def __init__(
        self,
        username: str,
        password: str | bytes | None = None,
        database: str | None = None,
        *,
        ssl: bool,
        capabilities: int = DEFAULT_CLIENT_CAPABILITIES,
        connect_attrs: Mapping[str, str] | None = None,
        charset: int = UTF8MB4_GENERAL_CI,
        max_packet: int = MAX_PACKET,
    ) -> None:
        self.username = username
        self.password = _pw(password)
        self.database = database
        self.ssl = ssl
        self.requested = capabilities
        self.connect_attrs = dict(connect_attrs or {})
        self.charset = charset
        self.max_packet = max_packet
        self.state = "greeting"
        self.greeting: HandshakeV10 | None = None
        self.capabilities = 0
        """What was negotiated (set once the greeting is in): parse commands with this."""
        self.plugin = ""
        self.nonce = b""
        self.ok: OkPacket | None = None
        self.error: ErrPacket | None = None
        self._seq = 0
        self._round_trips = 0
        self._step = ""  # what the last packet sent was, to judge the next reply

    @property
    def done(self) -> bool:
        return self.state == "done"

    @property
    def failed(self) -> bool:
        return self.state == "failed"

    def _check_state(self, *states: str) -> None:
        if self.state not in states:
            raise RuntimeError(f"ClientAuth: called in state {self.state!r}, expected {' or '.join(states)}")

    def _send(self, payload: bytes) -> bytes:
        out = encode_packet(self._seq, payload)
        self._seq = (self._seq + packets_for(len(payload))) & 0xFF
        return out

    def on_greeting(self, greeting: HandshakeV10) -> bytes:
        """Take the server's greeting: returns the SSLRequest (when `ssl`) or the login."""
        self._check_state("greeting")
        self.greeting = greeting
        server = greeting.capabilities
        if not server & CLIENT_PROTOCOL_41:
            raise ProtocolError("server does not speak the 4.1 protocol", kind="unsupported")
        if self.ssl and not server & CLIENT_SSL:
            raise ProtocolError("server does not support TLS (CLIENT_SSL not offered)", kind="no_tls")
        want = self.requested | CLIENT_PROTOCOL_41 | CLIENT_SECURE_CONNECTION | CLIENT_PLUGIN_AUTH
        want &= ~(CLIENT_SSL | CLIENT_COMPRESS | CLIENT_ZSTD_COMPRESSION_ALGORITHM | CLIENT_CONNECT_WITH_DB)
        want &= ~CLIENT_CONNECT_ATTRS
        if self.ssl:
            want |= CLIENT_SSL
        if self.database:
            want |= CLIENT_CONNECT_WITH_DB
        if self.connect_attrs:
            want |= CLIENT_CONNECT_ATTRS
        self.capabilities = want & server
        if self.capabilities >> 32:
            self.capabilities &= ~CLIENT_MYSQL
        self._seq = 1
        if self.ssl:
            self.state = "tls"
            return self._send(SSLRequest(self.capabilities, self.max_packet, self.charset).encode())
        return self._login()

    def tls_established(self) -> bytes:
        """Call once TLS is up (after sending the SSLRequest): returns the login packet."""
        self._check_state("tls")
        return self._login()

    def _login(self) -> bytes:
        assert self.greeting is not None
        self.state = "auth"
        plugin = self.greeting.auth_plugin_name or NATIVE_PASSWORD
        if plugin not in (NATIVE_PASSWORD, CACHING_SHA2_PASSWORD, SHA256_PASSWORD):
            # Answer for a plugin we know; the server switches us if the account needs another.
            plugin = NATIVE_PASSWORD
        self.plugin = plugin
        self.nonce = self.greeting.auth_plugin_data
        auth = self._first_response()
        if not self.capabilities & CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA and len(auth) > 255:
            raise ProtocolError("auth response too long for a server without lenenc client data")
        resp = HandshakeResponse41(
            self.capabilities,
            self.username,
            auth,
            self.database,
            plugin,
            self.connect_attrs,
            self.max_packet,
            self.charset,
        )
        return self._send(resp.encode())

    def _first_response(self) -> bytes:
        """The auth data for the current plugin and nonce, at the start of an exchange."""
        self._step = "scramble"
        if self.plugin == NATIVE_PASSWORD:
            return native_password_scramble(self.password, self.nonce)
        if self.plugin == CACHING_SHA2_PASSWORD:
            return caching_sha2_scramble(self.password, self.nonce)
        if self.plugin == SHA256_PASSWORD:
            if not self.password:
                return b"\0"
            if self.ssl:
                self._step = "cleartext"
                return self.password + b"\0"
            self._step = "key_request"
            return bytes((SHA256_REQUEST_PUBLIC_KEY,))
        if self.plugin == CLEAR_PASSWORD:
            if not self.ssl:
                raise ProtocolError(
                    "server asked for mysql_clear_password without TLS; refusing to send the password",
                    kind="unsupported",
                )
            self._step = "cleartext"
            return self.password + b"\0"
        raise ProtocolError(f"server asked for unsupported auth plugin {self.plugin!r}", kind="unsupported")

    def receive(self, packet: Packet) -> bytes:
        """Feed one server packet (the greeting first); returns wire bytes to send, maybe b""."""
        self._check_state("greeting", "auth")
        payload = packet.payload
        if self.state == "greeting":
            if payload[:1] == b"\xff":
                self.error = ErrPacket.parse(payload)
                self.state = "failed"
                return b""
            if packet.seq != 0:
                raise ProtocolError(f"greeting has sequence {packet.seq}, expected 0")
            return self.on_greeting(HandshakeV10.parse(payload))
        if packet.seq != self._seq:
            raise ProtocolError(f"auth reply has sequence {packet.seq}, expected {self._seq}")
        self._seq = packet.next_seq
        self._round_trips += 1
        if self._round_trips > self.MAX_ROUND_TRIPS:
            raise ProtocolError("server keeps the authentication going; giving up", kind="malformed")
        reply = parse_auth_reply(payload, self.capabilities)
        if isinstance(reply, OkPacket):
            self.ok = reply
            self.state = "done"
            return b""
        if isinstance(reply, ErrPacket):
            self.error = reply
            self.state = "failed"
            return b""
        if isinstance(reply, AuthSwitchRequest):
            if not self.capabilities & CLIENT_PLUGIN_AUTH and reply.plugin != "mysql_old_password":
                raise ProtocolError("auth switch from a server that did not agree to CLIENT_PLUGIN_AUTH")
            if reply.plugin == "mysql_old_password":
                raise ProtocolError("server asked for pre-4.1 password hashing", kind="unsupported")
            self.plugin = reply.plugin
            self.nonce = reply.nonce
            return self._send(self._first_response())
        answer = self._more_data(reply.data)
        return b"" if answer is None else self._send(answer)

    def _more_data(self, data: bytes) -> bytes | None:
        """The answer to AuthMoreData, or None when there is none to send (fast-auth success)."""
        step = self._step
        if self.plugin == CACHING_SHA2_PASSWORD and step == "scramble" and len(data) == 1:
            if data[0] == CACHING_SHA2_FAST_AUTH_SUCCESS:
                self._step = "fast_ok"
                return None
            if data[0] == CACHING_SHA2_PERFORM_FULL_AUTH:
                if self.ssl:
                    self._step = "cleartext"
                    return self.password + b"\0"
                self._step = "key_request"
                return bytes((CACHING_SHA2_REQUEST_PUBLIC_KEY,))
        if self.plugin in (CACHING_SHA2_PASSWORD, SHA256_PASSWORD) and step == "key_request":
            self._step = "rsa"
            return caching_sha2_rsa_encrypt(self.password, self.nonce, data)
        raise ProtocolError(
            f"unexpected AuthMoreData ({len(data)} bytes) for {self.plugin} after {step}", kind="malformed"
        )


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------


class Command:
    """A parsed client command; `code` is its COM_* byte."""

    __slots__ = ()
    code: ClassVar[int]

    @property
    def name(self) -> str:
        return COMMAND_NAMES.get(self.code, f"COM_0x{self.code:02x}")


@dataclass(frozen=True, slots=True)
class Query(Command):
    """COM_QUERY. `attributes` are the CLIENT_QUERY_ATTRIBUTES (name, value) pairs, if any."""

    sql: str
    attributes: tuple[tuple[str, Any], ...] = ()
    code: ClassVar[int] = COM_QUERY


@dataclass(frozen=True, slots=True)
class InitDB(Command):
    schema: str
    code: ClassVar[int] = COM_INIT_DB


@dataclass(frozen=True, slots=True)
class FieldList(Command):
    table: str
    wildcard: str = ""
    code: ClassVar[int] = COM_FIELD_LIST


@dataclass(frozen=True, slots=True)
class StmtPrepare(Command):
    sql: str
    code: ClassVar[int] = COM_STMT_PREPARE


@dataclass(frozen=True, slots=True)
class StmtExecute(Command):
    """COM_STMT_EXECUTE; `params` is the raw parameter block, decoded by `StatementTracker`."""

    stmt_id: int
    flags: int
    params: bytes = b""
    iteration_count: int = 1
    code: ClassVar[int] = COM_STMT_EXECUTE


@dataclass(frozen=True, slots=True)
class StmtSendLongData(Command):
    stmt_id: int
    param_id: int
    data: bytes
    code: ClassVar[int] = COM_STMT_SEND_LONG_DATA


@dataclass(frozen=True, slots=True)
class StmtClose(Command):
    stmt_id: int
    code: ClassVar[int] = COM_STMT_CLOSE


@dataclass(frozen=True, slots=True)
class StmtReset(Command):
    stmt_id: int
    code: ClassVar[int] = COM_STMT_RESET


@dataclass(frozen=True, slots=True)
class ChangeUser(Command):
    user: str
    code: ClassVar[int] = COM_CHANGE_USER


@dataclass(frozen=True, slots=True)
class Quit(Command):
    code: ClassVar[int] = COM_QUIT


@dataclass(frozen=True, slots=True)
class Ping(Command):
    code: ClassVar[int] = COM_PING


@dataclass(frozen=True, slots=True)
class ResetConnection(Command):
    code: ClassVar[int] = COM_RESET_CONNECTION


@dataclass(frozen=True, slots=True)
class OtherCommand(Command):
    """Any other command; `payload` is everything after the command byte."""

    code: int  # type: ignore[misc]
    payload: bytes = b""


def parse_command(payload: bytes, capabilities: int = 0) -> Command:
    """Parse a client command packet; `capabilities` are the ones negotiated on that connection."""
    if not payload:
        raise ProtocolError("malformed command: empty packet", kind="malformed")
    code = payload[0]
    name = COMMAND_NAMES.get(code, f"command 0x{code:02x}")
    r = _Reader(payload, name, 1)
    if code == COM_QUERY:
        attrs: tuple[tuple[str, Any], ...] = ()
        if capabilities & CLIENT_QUERY_ATTRIBUTES:
            count = r.lenenc_int("parameter_count")
            r.lenenc_int("parameter_set_count")
            if count:
                values, _, names = _read_bound_params(r, count, None, named=True)
                attrs = tuple(zip(names, values, strict=True))
        return Query(r.rest().decode("utf-8", "replace"), attrs)
    if code == COM_INIT_DB:
        return InitDB(r.text(r.rest(), "schema name"))
    if code == COM_STMT_PREPARE:
        return StmtPrepare(r.rest().decode("utf-8", "replace"))
    if code == COM_STMT_EXECUTE:
        stmt_id = r.int(4, "statement_id")
        flags = r.u8("flags")
        iterations = r.int(4, "iteration_count")
        return StmtExecute(stmt_id, flags, r.rest(), iterations)
    if code == COM_STMT_SEND_LONG_DATA:
        stmt_id = r.int(4, "statement_id")
        return StmtSendLongData(stmt_id, r.int(2, "param_id"), r.rest())
    if code == COM_STMT_CLOSE:
        return StmtClose(r.int(4, "statement_id"))
    if code == COM_STMT_RESET:
        return StmtReset(r.int(4, "statement_id"))
    if code == COM_CHANGE_USER:
        return ChangeUser(r.text(r.nul_bytes("user", eof_ok=True), "user"))
    if code == COM_FIELD_LIST:
        table = r.nul_bytes("table", eof_ok=True).decode("utf-8", "replace")
        return FieldList(table, r.rest().decode("utf-8", "replace"))
    if code == COM_QUIT:
        return Quit()
    if code == COM_PING:
        return Ping()
    if code == COM_RESET_CONNECTION:
        return ResetConnection()
    return OtherCommand(code, r.rest())


# --------------------------------------------------------------------------------------------
# Binary-protocol parameter values
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LongData:
    """A parameter sent in COM_STMT_SEND_LONG_DATA pieces: its size and first bytes."""

    size: int
    head: bytes


LONG_DATA_HEAD = 256
"""How many bytes of a long-data parameter the tracker keeps for the audit log."""


def _read_value(r: _Reader, type_code: int, unsigned: bool, name: str) -> Any:
    size = _INT_SIZES.get(type_code)
    if size is not None:
        return int.from_bytes(r.take(size, name), "little", signed=not unsigned)
    if type_code == TYPE_NULL:
        return None
    if type_code == TYPE_FLOAT:
        return struct.unpack("<f", r.take(4, name))[0]
    if type_code == TYPE_DOUBLE:
        return struct.unpack("<d", r.take(8, name))[0]
    if type_code in _DATE_TYPES:
        return _read_datetime(r, type_code, name)
    if type_code == TYPE_TIME:
        return _read_time(r, name)
    if type_code in _DECIMAL_TYPES:
        return r.lenenc_bytes(name).decode("ascii", "replace")
    if type_code in _TEXT_TYPES:
        raw = r.lenenc_bytes(name)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw
    if type_code in _BYTES_TYPES:
        return r.lenenc_bytes(name)
    raise ProtocolError(f"unsupported parameter type {type_code} in {r.what}", kind="unsupported")


def _read_datetime(r: _Reader, type_code: int, name: str) -> _dt.date | _dt.datetime | str:
    n = r.u8(name)
    if n not in (0, 4, 7, 11):
        raise r.error(f"{name}: a date/time value of {n} bytes")
    body = _Reader(r.take(n, name), r.what)
    y = mo = d = h = mi = s = us = 0
    if n >= 4:
        y, mo, d = body.int(2, name), body.u8(name), body.u8(name)
    if n >= 7:
        h, mi, s = body.u8(name), body.u8(name), body.u8(name)
    if n == 11:
        us = body.int(4, name)
    try:
        if type_code in (TYPE_DATE, TYPE_NEWDATE) and n <= 4:
            return _dt.date(y, mo, d)
        return _dt.datetime(y, mo, d, h, mi, s, us)  # MySQL values carry no time zone
    except ValueError:  # zero dates and other values Python cannot hold: keep MySQL's spelling
        text = f"{y:04d}-{mo:02d}-{d:02d}"
        if type_code in (TYPE_DATE, TYPE_NEWDATE) and n <= 4:
            return text
        return f"{text} {h:02d}:{mi:02d}:{s:02d}" + (f".{us:06d}" if us else "")


def _read_time(r: _Reader, name: str) -> _dt.timedelta | str:
    n = r.u8(name)
    if n not in (0, 8, 12):
        raise r.error(f"{name}: a time value of {n} bytes")
    body = _Reader(r.take(n, name), r.what)
    neg = days = h = mi = s = us = 0
    if n >= 8:
        neg, days = body.u8(name), body.int(4, name)
        h, mi, s = body.u8(name), body.u8(name), body.u8(name)
    if n == 12:
        us = body.int(4, name)
    try:
        delta = _dt.timedelta(days=days, hours=h, minutes=mi, seconds=s, microseconds=us)
    except OverflowError:
        return ("-" if neg else "") + f"{days * 24 + h:02d}:{mi:02d}:{s:02d}" + (f".{us:06d}" if us else "")
    return -delta if neg else delta


def _read_bound_params(
    r: _Reader,
    count: int,
    types: list[tuple[int, bool]] | None,
    *,
    named: bool,
    long_data: Mapping[int, LongData] | None = None,
) -> tuple[list[Any], list[tuple[int, bool]], list[str]]:
    """Null bitmap, new-params-bound flag, [types (+ names)], values. Returns values, types, names."""
    if count > MAX_PARAMS:
        raise r.error(f"{count} parameters (at most {MAX_PARAMS})")
    bitmap = r.take((count + 7) // 8, "null bitmap")
    bound = r.u8("new_params_bound_flag")
    names: list[str] = []
    if bound:
        types = []
        for i in range(count):
            t = r.u8(f"type of parameter {i}")
            flags = r.u8(f"type of parameter {i}")
            types.append((t, bool(flags & PARAM_FLAG_UNSIGNED)))
            if named:
                names.append(r.lenenc_bytes(f"name of parameter {i}").decode("utf-8", "replace"))
    elif types is None or len(types) < count:
        raise r.error("parameters sent without types, and none were bound before")
    if not names:
        names = [""] * count
    values: list[Any] = []
    for i in range(count):
        if bitmap[i >> 3] >> (i & 7) & 1:
            values.append(None)
        elif long_data and i in long_data:
            values.append(long_data[i])
        else:
            t, unsigned = types[i]
            values.append(_read_value(r, t, unsigned, f"parameter {i}"))
    return values, types[:count], names


# --------------------------------------------------------------------------------------------
# Prepared statements
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StmtPrepareOk:
    stmt_id: int
    num_columns: int
    num_params: int
    warnings: int = 0
    metadata_follows: bool = True

    @classmethod
    def parse(cls, payload: bytes) -> StmtPrepareOk:
        r = _Reader(payload, "COM_STMT_PREPARE_OK")
        if r.u8("status") != 0x00:
            raise r.error("status is not 0x00")
        stmt_id = r.int(4, "statement_id")
        cols = r.int(2, "num_columns")
        params = r.int(2, "num_params")
        warnings = 0
        if r.remaining:
            r.u8("reserved")
            warnings = r.int(2, "warning_count") if r.remaining >= 2 else 0
        metadata = r.u8("metadata_follows") != 0 if r.remaining else True
        return cls(stmt_id, cols, params, warnings, metadata)

    def encode(self) -> bytes:
        return b"\x00" + struct.pack(
            "<IHHBH", self.stmt_id, self.num_columns, self.num_params, 0, self.warnings
        )


@dataclass(slots=True)
class PreparedStatement:
    stmt_id: int
    sql: str
    num_params: int
    num_columns: int
    param_types: list[tuple[int, bool]] | None = None
    long_data: dict[int, LongData] = field(default_factory=dict)


class StatementTracker:
    """Remembers prepared statements so COM_STMT_EXECUTE parameters can be decoded for the audit.

    Feed it every client command (`observe`) and the server packets answering each
    COM_STMT_PREPARE (`feed_server`, while `awaiting_prepare`). Memory is bounded: at most
    `max_statements` statements, least recently used dropped first (their executes then decode
    to None).
    """

    def __init__(self, *, capabilities: int = 0, max_statements: int = 1000) -> None:
        self.capabilities = capabilities
        self.max_statements = max_statements
        self._stmts: OrderedDict[int, PreparedStatement] = OrderedDict()
        self._pending: deque[str] = deque()
        self._skip = 0  # definition packets still to come for the current prepare response
        self._last_id: int | None = None

    def __len__(self) -> int:
        return len(self._stmts)

    @property
    def awaiting_prepare(self) -> bool:
        """True while the server's answer to a COM_STMT_PREPARE is (partly) still to come."""
        return bool(self._pending or self._skip)

    def get(self, stmt_id: int) -> PreparedStatement | None:
        if stmt_id == STMT_ID_LAST_PREPARED and self._last_id is not None:
            stmt_id = self._last_id
        st = self._stmts.get(stmt_id)
        if st is not None:
            self._stmts.move_to_end(stmt_id)
        return st

    def prepare_sent(self, sql: str) -> None:
        self._pending.append(sql)

    def feed_server(self, payload: bytes) -> PreparedStatement | None:
        """One server packet of a prepare response; returns the statement when the OK arrives."""
        if self._skip:
            self._skip -= 1
            return None
        if not self._pending:
            raise ProtocolError("server packet fed to StatementTracker with no COM_STMT_PREPARE pending")
        sql = self._pending.popleft()
        if payload[:1] == b"\xff":
            return None
        ok = StmtPrepareOk.parse(payload)
        if ok.metadata_follows:
            eof = 0 if self.capabilities & CLIENT_DEPRECATE_EOF else 1
            self._skip = (ok.num_params + eof if ok.num_params else 0) + (
                ok.num_columns + eof if ok.num_columns else 0
            )
        st = PreparedStatement(ok.stmt_id, sql, ok.num_params, ok.num_columns)
        self._stmts.pop(ok.stmt_id, None)
        self._stmts[ok.stmt_id] = st
        while len(self._stmts) > self.max_statements:
            self._stmts.popitem(last=False)
        self._last_id = ok.stmt_id
        return st

    def close(self, stmt_id: int) -> None:
        self._stmts.pop(stmt_id, None)

    def clear(self) -> None:
        """COM_RESET_CONNECTION / COM_CHANGE_USER: the server forgets every statement."""
        self._stmts.clear()
        self._last_id = None

    def observe(self, cmd: Command) -> list[Any] | None:
        """Book-keep one client command; for COM_STMT_EXECUTE return its decoded parameters."""
        if isinstance(cmd, StmtPrepare):
            self.prepare_sent(cmd.sql)
        elif isinstance(cmd, StmtExecute):
            return self.decode_execute(cmd)
        elif isinstance(cmd, StmtSendLongData):
            st = self.get(cmd.stmt_id)
            if st is not None and cmd.param_id < st.num_params:
                prev = st.long_data.get(cmd.param_id, LongData(0, b""))
                head = prev.head + cmd.data[: max(0, LONG_DATA_HEAD - len(prev.head))]
                st.long_data[cmd.param_id] = LongData(prev.size + len(cmd.data), head)
        elif isinstance(cmd, StmtClose):
            self.close(cmd.stmt_id)
        elif isinstance(cmd, StmtReset):
            st = self.get(cmd.stmt_id)
            if st is not None:
                st.long_data.clear()
        elif isinstance(cmd, (ResetConnection, ChangeUser)):
            self.clear()
        return None

    def decode_execute(self, cmd: StmtExecute) -> list[Any] | None:
        """The statement's parameter values, or None if the statement is unknown (or evicted).

        Values: None (NULL), int, float, str (text types, decimals), bytes (blobs, or text that
        is not UTF-8), date/datetime/timedelta (or MySQL's spelling when Python cannot hold the
        value, such as a zero date), `LongData` for parameters sent with COM_STMT_SEND_LONG_DATA.
        Query attributes sent along (CLIENT_QUERY_ATTRIBUTES) are decoded and dropped.
        """
        st = self.get(cmd.stmt_id)
        if st is None:
            return None
        r = _Reader(cmd.params, "COM_STMT_EXECUTE parameters")
        qa = bool(self.capabilities & CLIENT_QUERY_ATTRIBUTES)
        values: list[Any] = []
        if st.num_params > 0 or (qa and cmd.flags & PARAMETER_COUNT_AVAILABLE):
            count = r.lenenc_int("parameter_count") if qa else st.num_params
            if count < st.num_params:
                raise r.error(f"{count} parameters sent for a statement with {st.num_params}")
            if count:
                values, types, _ = _read_bound_params(
                    r, count, st.param_types, named=qa, long_data=st.long_data
                )
                st.param_types = types
        st.long_data.clear()
        return values[: st.num_params]


# --------------------------------------------------------------------------------------------
# Audit rendering
# --------------------------------------------------------------------------------------------


def _marker(omitted: int) -> str:
    return f"…[truncated {omitted} bytes]"


def _describe_text(text: str, max_len: int) -> str:
    if len(text) <= max_len:
        return text
    kept = text[:max_len]
    return kept + _marker(
        len(text.encode("utf-8", "surrogatepass")) - len(kept.encode("utf-8", "surrogatepass"))
    )


def _describe_bytes(raw: bytes, max_len: int, total: int | None = None) -> str:
    total = len(raw) if total is None else total
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and all(c.isprintable() or c in "\t\r\n" for c in text):
        kept = text[:max_len]
        omitted = total - len(kept.encode())
        return kept + (_marker(omitted) if omitted else "")
    keep = max(0, (max_len - 2) // 2)
    shown = raw[:keep]
    omitted = total - len(shown)
    return "0x" + shown.hex() + (_marker(omitted) if omitted else "")


def _describe_time(delta: _dt.timedelta) -> str:
    us = delta // _dt.timedelta(microseconds=1)
    sign = "-" if us < 0 else ""
    us = abs(us)
    secs, frac = divmod(us, 1_000_000)
    mins, s = divmod(secs, 60)
    h, m = divmod(mins, 60)
    return f"{sign}{h:02d}:{m:02d}:{s:02d}" + (f".{frac:06d}" if frac else "")


def describe_params(values: Iterable[Any], max_len: int = 256) -> list[str]:
    """Parameter values as audit strings: NULL, numbers, text, `0x…` hex for binary, dates.

    Anything longer than `max_len` characters is cut and ends with `…[truncated N bytes]`,
    N being how many bytes of the value are not shown; nothing is dropped silently.
    """
    out: list[str] = []
    for v in values:
        if v is None:
            out.append("NULL")
        elif isinstance(v, bool | int | float):
            out.append(repr(v))
        elif isinstance(v, str):
            out.append(_describe_text(v, max_len))
        elif isinstance(v, bytes | bytearray | memoryview):
            out.append(_describe_bytes(bytes(v), max_len))
        elif isinstance(v, LongData):
            out.append(_describe_bytes(v.head, max_len, v.size))
        elif isinstance(v, _dt.datetime):
            out.append(v.isoformat(sep=" "))
        elif isinstance(v, _dt.date):
            out.append(v.isoformat())
        elif isinstance(v, _dt.timedelta):
            out.append(_describe_time(v))
        else:
            out.append(_describe_text(str(v), max_len))
    return out
