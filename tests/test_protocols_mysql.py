"""The MySQL/MariaDB codec: framing, handshake, auth state machine, commands, prepared statements.

Wire bytes here are built by hand, the way a real client or server lays them out, rather than with
the codec's own encoders, so a symmetric mistake in encode and parse cannot hide.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import itertools
import os
import shutil
import socket
import struct
import subprocess
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wardgate.protocols import mysql as m
from wardgate.protocols.errors import ProtocolError

NONCE = b"Zq3!x9Lm#pQ7&rT2^vW5"
assert len(NONCE) == 20


# ------------------------------------------------------------------------------------------
# Independent helpers
# ------------------------------------------------------------------------------------------


def lenenc(n: int) -> bytes:
    if n < 251:
        return bytes([n])
    if n < 65536:
        return b"\xfc" + struct.pack("<H", n)
    if n < 1 << 24:
        return b"\xfd" + struct.pack("<I", n)[:3]
    return b"\xfe" + struct.pack("<Q", n)


def lstr(b: bytes | str) -> bytes:
    b = b.encode() if isinstance(b, str) else b
    return lenenc(len(b)) + b


def frame(seq: int, payload: bytes) -> bytes:
    return struct.pack("<I", len(payload))[:3] + bytes([seq]) + payload


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


def one(wire: bytes) -> m.Packet:
    pkts = m.PacketReader().feed(wire)
    assert len(pkts) == 1
    return pkts[0]


def pkt(seq: int, payload: bytes) -> m.Packet:
    return m.Packet(seq, payload, frame(seq, payload))


def sha1(data: bytes) -> bytes:
    return hashlib.sha1(data, usedforsecurity=False).digest()


def xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")


MYSQL8_CAPS = 0xDFFFFFFF  # what MySQL 8.0 advertises (lower 0xffff, upper 0xdfff)


def mysql8_greeting(
    nonce: bytes = NONCE, plugin: bytes = b"caching_sha2_password", caps: int = MYSQL8_CAPS
) -> bytes:
    return (
        b"\x0a"
        + b"8.0.36\x00"
        + struct.pack("<I", 42)
        + nonce[:8]
        + b"\x00"
        + struct.pack("<H", caps & 0xFFFF)
        + b"\xff"  # utf8mb4_0900_ai_ci
        + struct.pack("<H", 2)
        + struct.pack("<H", caps >> 16)
        + bytes([len(nonce) + 1])
        + bytes(10)
        + nonce[8:]
        + b"\x00"
        + plugin
        + b"\x00"
    )


def mariadb_greeting(nonce: bytes = NONCE) -> bytes:
    caps = 0xFFFE  # lower: no CLIENT_MYSQL bit
    upper = 0x81BF
    ext = 0x1D  # PROGRESS | STMT_BULK_OPERATIONS | EXTENDED_METADATA | CACHE_METADATA
    return (
        b"\x0a5.5.5-10.11.19-MariaDB-0+deb12u1\x00"
        + struct.pack("<I", 7)
        + nonce[:8]
        + b"\x00"
        + struct.pack("<HBHH", caps, 45, 2, upper)
        + bytes([21])
        + bytes(6)
        + struct.pack("<I", ext)
        + nonce[8:]
        + b"\x00"
        + b"mysql_native_password\x00"
    )


LIBMYSQL_CAPS = (
    m.CLIENT_LONG_PASSWORD
    | m.CLIENT_LONG_FLAG
    | m.CLIENT_CONNECT_WITH_DB
    | m.CLIENT_LOCAL_FILES
    | m.CLIENT_PROTOCOL_41
    | m.CLIENT_INTERACTIVE
    | m.CLIENT_TRANSACTIONS
    | m.CLIENT_SECURE_CONNECTION
    | m.CLIENT_MULTI_STATEMENTS
    | m.CLIENT_MULTI_RESULTS
    | m.CLIENT_PS_MULTI_RESULTS
    | m.CLIENT_PLUGIN_AUTH
    | m.CLIENT_CONNECT_ATTRS
    | m.CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA
    | m.CLIENT_CAN_HANDLE_EXPIRED_PASSWORDS
    | m.CLIENT_SESSION_TRACK
    | m.CLIENT_DEPRECATE_EOF
    | m.CLIENT_QUERY_ATTRIBUTES
)

ATTRS = {
    "_os": "Linux",
    "_client_name": "libmysql",
    "_pid": "31337",
    "_client_version": "8.0.36",
    "_platform": "x86_64",
    "program_name": "mysql",
}


def libmysql_response(auth: bytes, caps: int = LIBMYSQL_CAPS, db: bytes = b"shop") -> bytes:
    attrs = b"".join(lstr(k) + lstr(v) for k, v in ATTRS.items())
    return (
        struct.pack("<IIB", caps, 16 * 1024 * 1024, 255)
        + bytes(23)
        + b"alice\x00"
        + lstr(auth)
        + db
        + b"\x00"
        + b"caching_sha2_password\x00"
        + lstr(attrs)
    )


# ------------------------------------------------------------------------------------------
# Framing
# ------------------------------------------------------------------------------------------


def test_encode_packet_layout() -> None:
    assert m.encode_packet(3, b"\x03SELECT 1") == b"\x09\x00\x00\x03\x03SELECT 1"
    assert m.encode_packet(0, b"") == b"\x00\x00\x00\x00"
    assert m.encode_packet(255, b"x") == b"\x01\x00\x00\xffx"


def test_reader_byte_by_byte() -> None:
    wire = frame(0, b"\x03SELECT 1") + frame(1, b"") + frame(7, b"abc" * 100)
    r = m.PacketReader()
    got: list[m.Packet] = []
    for i in range(len(wire)):
        got += r.feed(wire[i : i + 1])
    assert [(p.seq, p.payload) for p in got] == [(0, b"\x03SELECT 1"), (1, b""), (7, b"abc" * 100)]
    assert b"".join(p.raw for p in got) == wire
    assert got[0].next_seq == 1 and got[2].next_seq == 8
    assert r.buffered == 0


@settings(max_examples=100, deadline=None)
@given(
    payloads=st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=600)), max_size=10),
    cuts=st.lists(st.integers(0, 1 << 16), max_size=20),
)
def test_reader_round_trip_any_chunking(payloads: list[tuple[int, bytes]], cuts: list[int]) -> None:
    wire = b"".join(m.encode_packet(s, p) for s, p in payloads)
    r = m.PacketReader()
    got = [p for piece in chunked(wire, cuts) for p in r.feed(piece)]
    assert [(p.seq, p.payload) for p in got] == payloads
    assert b"".join(p.raw for p in got) == wire


@pytest.mark.parametrize("size", [m.MAX_PAYLOAD - 1, m.MAX_PAYLOAD, m.MAX_PAYLOAD + 100, 2 * m.MAX_PAYLOAD])
def test_multi_packet_payload(size: int) -> None:
    payload = os.urandom(1024) * (size // 1024) + os.urandom(size % 1024)
    wire = m.encode_packet(254, payload) + frame(9, b"next")
    physical = size // m.MAX_PAYLOAD + 1
    assert m.packets_for(size) == physical
    assert len(wire) == size + 4 * physical + 8
    # An exact multiple of 0xffffff ends with an empty packet.
    if size % m.MAX_PAYLOAD == 0:
        assert wire[-8 - 4 : -8] == b"\x00\x00\x00" + bytes([(254 + physical - 1) & 0xFF])
    r = m.PacketReader(max_packet=64 << 20)
    got = [p for i in range(0, len(wire), 1 << 20) for p in r.feed(wire[i : i + (1 << 20)])]
    assert len(got) == 2
    big = got[0]
    assert big.payload == payload
    assert big.raw == wire[:-8]
    assert big.seq == 254
    assert big.last_seq == (254 + physical - 1) & 0xFF
    assert big.next_seq == (254 + physical) & 0xFF
    assert got[1].payload == b"next"


def test_reader_limits_and_order() -> None:
    with pytest.raises(ProtocolError, match="exceeds the 100-byte limit") as info:
        m.PacketReader(max_packet=100).feed(b"\x65\x00\x00\x00")
    assert info.value.kind == "oversized"
    # A 16 MiB logical packet is over a 16 MiB - 1 limit as soon as the second header arrives.
    r = m.PacketReader(max_packet=m.MAX_PAYLOAD)
    assert r.feed(b"\xff\xff\xff\x00" + bytes(m.MAX_PAYLOAD)) == []
    with pytest.raises(ProtocolError, match="exceeds"):
        r.feed(b"\x01\x00\x00\x01")
    r = m.PacketReader()
    r.feed(b"\xff\xff\xff\x05" + bytes(m.MAX_PAYLOAD))
    with pytest.raises(ProtocolError, match="out of order"):
        r.feed(b"\x01\x00\x00\x07x")


@settings(max_examples=300, deadline=None)
@given(n=st.integers(0, 2**64 - 1), prefix=st.binary(max_size=5))
def test_lenenc_int_round_trip(n: int, prefix: bytes) -> None:
    enc = m.write_lenenc_int(n)
    assert enc == lenenc(n)
    assert m.read_lenenc_int(prefix + enc + b"tail", len(prefix)) == (n, len(prefix) + len(enc))
    for cut in range(len(enc)):
        with pytest.raises(ProtocolError):
            m.read_lenenc_int(enc[:cut])


@given(data=st.binary(max_size=300))
def test_lenenc_str_round_trip(data: bytes) -> None:
    enc = m.write_lenenc_str(data)
    assert m.read_lenenc_str(enc + b"x") == (data, len(enc))
    if data:
        with pytest.raises(ProtocolError):
            m.read_lenenc_str(enc[:-1])


def test_lenenc_bad_values() -> None:
    for first in (0xFB, 0xFF):
        with pytest.raises(ProtocolError, match="not a length-encoded integer"):
            m.read_lenenc_int(bytes([first]))
    for bad in (-1, 2**64):
        with pytest.raises(ValueError, match="length-encoded"):
            m.write_lenenc_int(bad)
    assert m.write_lenenc_int(250) == b"\xfa"
    assert m.write_lenenc_int(251) == b"\xfc\xfb\x00"
    assert m.write_lenenc_int(65536) == b"\xfd\x00\x00\x01"
    assert m.write_lenenc_int(1 << 24) == b"\xfe\x00\x00\x00\x01\x00\x00\x00\x00"


# ------------------------------------------------------------------------------------------
# Handshake
# ------------------------------------------------------------------------------------------


def test_parse_mysql8_greeting() -> None:
    g = m.HandshakeV10.parse(mysql8_greeting())
    assert g.server_version == "8.0.36"
    assert g.connection_id == 42
    assert g.auth_plugin_data == NONCE
    assert g.capabilities == MYSQL8_CAPS
    assert g.charset == 255 and g.status == 2
    assert g.auth_plugin_name == "caching_sha2_password"
    assert m.HandshakeV10.parse(g.encode()) == g


def test_parse_mariadb_greeting_extended_caps() -> None:
    g = m.HandshakeV10.parse(mariadb_greeting())
    assert g.server_version.startswith("5.5.5-10.11.19-MariaDB")
    assert g.auth_plugin_name == "mysql_native_password"
    assert g.auth_plugin_data == NONCE
    assert not g.capabilities & m.CLIENT_MYSQL
    assert g.capabilities & m.MARIADB_CLIENT_PROGRESS
    assert g.capabilities & m.MARIADB_CLIENT_CACHE_METADATA
    assert g.capabilities & m.CLIENT_PROTOCOL_41
    assert m.HandshakeV10.parse(g.encode()) == g


def test_greeting_without_trailing_nul_and_encode_defaults() -> None:
    g = m.HandshakeV10.parse(mysql8_greeting()[:-1])
    assert g.auth_plugin_name == "caching_sha2_password"
    ours = m.HandshakeV10("8.0.36-wardgate", 9, m.new_nonce())
    assert len(ours.auth_plugin_data) == 20 and b"\0" not in ours.auth_plugin_data
    assert b"$" not in ours.auth_plugin_data
    back = m.HandshakeV10.parse(ours.encode())
    assert back == ours
    with pytest.raises(ValueError, match="CLIENT_MYSQL"):
        m.HandshakeV10("x", 1, NONCE, capabilities=m.CLIENT_MYSQL | m.MARIADB_CLIENT_PROGRESS).encode()


def test_greeting_errors() -> None:
    err = b"\xff\x6a\x04Host '10.0.0.9' is not allowed to connect to this MariaDB server"
    with pytest.raises(ProtocolError, match="not allowed to connect") as info:
        m.HandshakeV10.parse(err)
    assert info.value.kind == "server_error"
    with pytest.raises(ProtocolError, match="protocol version 9") as info:
        m.HandshakeV10.parse(b"\x09" + mysql8_greeting()[1:])
    assert info.value.kind == "unsupported"
    with pytest.raises(ProtocolError, match="server version is not NUL-terminated"):
        m.HandshakeV10.parse(b"\x0a8.0.36")
    with pytest.raises(ProtocolError, match="auth plugin name is not valid UTF-8"):
        m.HandshakeV10.parse(mysql8_greeting(plugin=b"\xff\xfe"))
    full = mysql8_greeting()
    for cut in range(len(full)):
        with contextlib.suppress(ProtocolError):
            m.HandshakeV10.parse(full[:cut])


def test_parse_libmysql_response() -> None:
    auth = m.caching_sha2_scramble("s3cret", NONCE)
    resp = m.HandshakeResponse41.parse(libmysql_response(auth))
    assert resp.capabilities == LIBMYSQL_CAPS
    assert resp.username == "alice"
    assert resp.auth_response == auth
    assert resp.database == "shop"
    assert resp.auth_plugin_name == "caching_sha2_password"
    assert resp.connect_attrs == ATTRS
    assert resp.charset == 255 and resp.max_packet == 16 << 20
    assert m.HandshakeResponse41.parse(resp.encode()) == resp
    assert m.parse_client_handshake(libmysql_response(auth)) == resp


def test_parse_old_style_response() -> None:
    """No LENENC client data, no attrs, no database: 1-byte auth length (e.g. old connectors)."""
    caps = m.CLIENT_PROTOCOL_41 | m.CLIENT_SECURE_CONNECTION | m.CLIENT_LONG_PASSWORD | m.CLIENT_TRANSACTIONS
    auth = m.native_password_scramble("pw", NONCE)
    raw = struct.pack("<IIB", caps, 1 << 24, 33) + bytes(23) + b"bob\x00" + bytes([20]) + auth
    resp = m.HandshakeResponse41.parse(raw)
    assert (resp.username, resp.auth_response, resp.database, resp.auth_plugin_name) == (
        "bob",
        auth,
        None,
        None,
    )
    assert resp.connect_attrs == {}
    assert m.HandshakeResponse41.parse(resp.encode()) == resp
    # Plugin auth but no trailing NUL after the plugin name, and a database flag with no database.
    caps2 = caps | m.CLIENT_PLUGIN_AUTH | m.CLIENT_CONNECT_WITH_DB
    raw2 = struct.pack("<IIB", caps2, 1 << 24, 33) + bytes(23) + b"bob\x00\x00" + b"\x00mysql_native_password"
    resp2 = m.HandshakeResponse41.parse(raw2)
    assert (resp2.auth_response, resp2.database, resp2.auth_plugin_name) == (b"", "", "mysql_native_password")


def test_ssl_request() -> None:
    raw = struct.pack("<IIB", LIBMYSQL_CAPS | m.CLIENT_SSL, 16 << 20, 255) + bytes(23)
    req = m.parse_client_handshake(raw)
    assert isinstance(req, m.SSLRequest)
    assert req.capabilities & m.CLIENT_SSL and req.charset == 255
    assert req.encode() == raw
    with pytest.raises(ProtocolError, match="CLIENT_SSL is not set"):
        m.SSLRequest.parse(struct.pack("<IIB", LIBMYSQL_CAPS, 0, 8) + bytes(23))
    with pytest.raises(ProtocolError, match="after the 32-byte request"):
        m.SSLRequest.parse(raw + b"x")


def test_response_errors() -> None:
    with pytest.raises(ProtocolError, match=r"pre-4\.1") as info:
        m.HandshakeResponse41.parse(struct.pack("<IIB", 0x0F, 0, 8) + bytes(23) + b"bob\x00")
    assert info.value.kind == "unsupported"
    bad_user = struct.pack("<IIB", LIBMYSQL_CAPS, 0, 8) + bytes(23) + b"b\xffb\x00\x00"
    with pytest.raises(ProtocolError, match="username is not valid UTF-8"):
        m.HandshakeResponse41.parse(bad_user)
    full = libmysql_response(b"x" * 32)
    with pytest.raises(ProtocolError, match="connect attributes runs past"):
        m.HandshakeResponse41.parse(full[:-3])
    for cut in range(len(full)):
        with contextlib.suppress(ProtocolError):
            m.parse_client_handshake(full[:cut])


def test_auth_phase_packets() -> None:
    switch = b"\xfemysql_native_password\x00" + NONCE + b"\x00"
    r = m.parse_auth_reply(switch)
    assert r == m.AuthSwitchRequest("mysql_native_password", NONCE + b"\x00")
    assert isinstance(r, m.AuthSwitchRequest) and r.nonce == NONCE and r.encode() == switch
    assert m.parse_auth_reply(b"\x01\x03") == m.AuthMoreData(b"\x03")
    assert m.AuthMoreData(b"\x04").encode() == b"\x01\x04"
    assert m.parse_auth_reply(b"\x00\x00\x00\x02\x00\x00\x00") == m.OkPacket(0, 0, 2, 0, "")
    assert m.parse_auth_reply(b"\xff\x15\x04#28000Access denied") == m.ErrPacket(
        1045, "28000", "Access denied"
    )
    assert m.parse_auth_reply(b"\xfe") == m.AuthSwitchRequest("mysql_old_password", b"")
    assert m.is_auth_switch(switch) and m.is_auth_more_data(b"\x01\x03")
    assert m.is_ok(b"\x00\x00\x00\x02\x00\x00\x00") and m.is_err(b"\xff\x15\x04")
    assert m.is_eof(b"\xfe\x00\x00\x02\x00") and not m.is_eof(b"\xfe" + bytes(9))
    with pytest.raises(ProtocolError, match="unexpected packet type 0x05"):
        m.parse_auth_reply(b"\x05")
    with pytest.raises(ProtocolError, match="empty"):
        m.parse_auth_reply(b"")


def test_builders() -> None:
    assert m.ok_packet(2) == b"\x07\x00\x00\x02\x00\x00\x00\x02\x00\x00\x00"
    assert m.ok_packet(1, affected_rows=300, last_insert_id=7, info="Rows matched: 1") == frame(
        1, b"\x00\xfc\x2c\x01\x07\x02\x00\x00\x00Rows matched: 1"
    )
    assert m.ok_packet(1, info="hi", capabilities=m.CLIENT_PROTOCOL_41 | m.CLIENT_SESSION_TRACK) == frame(
        1, b"\x00\x00\x00\x02\x00\x00\x00\x02hi"
    )
    msg = "Access denied for user 'bob'@'10.1.2.3' (using password: NO)"
    err = m.err_packet(2, 1045, "28000", msg)
    assert err == frame(2, b"\xff\x15\x04#28000" + msg.encode())
    parsed = m.ErrPacket.parse(one(err).payload)
    assert str(parsed) == f"ERROR 1045 (28000): {msg}"
    assert m.eof_packet(5) == frame(5, b"\xfe\x00\x00\x02\x00")
    assert m.EofPacket.parse(b"\xfe\x01\x00\x03\x00") == m.EofPacket(1, 3)
    with pytest.raises(ValueError, match="sqlstate"):
        m.err_packet(1, 1045, "2800", "x")
    # An ERR without the '#' marker (sent before capabilities are agreed).
    assert m.ErrPacket.parse(b"\xff\x10\x04Too many connections") == m.ErrPacket(
        1040, "HY000", "Too many connections"
    )
    ok = m.OkPacket.parse(
        b"\x00\x01\x00\x02\x40\x00\x00\x04info",
        m.CLIENT_PROTOCOL_41 | m.CLIENT_SESSION_TRACK,
    )
    assert ok == m.OkPacket(1, 0, 0x4002, 0, "info")


# ------------------------------------------------------------------------------------------
# Auth math
# ------------------------------------------------------------------------------------------


def test_native_scramble_matches_server_check() -> None:
    pw = "correct horse"
    token = m.native_password_scramble(pw, NONCE)
    # Independently: SHA1(pw) XOR SHA1(nonce + SHA1(SHA1(pw))).
    s1 = sha1(pw.encode())
    s2 = sha1(s1)
    assert token == xor(s1, sha1(NONCE + s2))
    # And the way the server verifies it from the stored hash alone.
    candidate = xor(token, sha1(NONCE + s2))
    assert sha1(candidate) == s2
    assert m.native_password_scramble("", NONCE) == b""
    assert m.native_password_scramble(None, NONCE) == b""
    assert m.native_password_scramble(pw.encode(), NONCE + b"\0") == token  # trailing NUL ignored


def test_caching_sha2_scramble_matches_server_check() -> None:
    pw = "pässwörd"
    token = m.caching_sha2_scramble(pw, NONCE)
    p1 = hashlib.sha256(pw.encode()).digest()
    p2 = hashlib.sha256(p1).digest()
    assert token == xor(p1, hashlib.sha256(p2 + NONCE).digest())
    assert hashlib.sha256(xor(token, hashlib.sha256(p2 + NONCE).digest())).digest() == p2
    assert m.caching_sha2_scramble("", NONCE) == b""
    assert m.CACHING_SHA2_FAST_AUTH_SUCCESS == 3 and m.CACHING_SHA2_PERFORM_FULL_AUTH == 4


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def rsa_decrypt(key: rsa.RSAPrivateKey, blob: bytes, nonce: bytes) -> bytes:
    sha1_ = hashes.SHA1()  # noqa: S303 - what the protocol uses
    oaep = padding.OAEP(mgf=padding.MGF1(sha1_), algorithm=sha1_, label=None)
    plain = key.decrypt(blob, oaep)
    return bytes(b ^ nonce[i % len(nonce)] for i, b in enumerate(plain))


def test_rsa_encrypt(rsa_key: rsa.RSAPrivateKey) -> None:
    blob = m.caching_sha2_rsa_encrypt("a rather long password, longer than the nonce", NONCE, pem(rsa_key))
    assert len(blob) == 256
    assert rsa_decrypt(rsa_key, blob, NONCE) == b"a rather long password, longer than the nonce\0"
    with pytest.raises(ProtocolError, match="unreadable RSA public key"):
        m.caching_sha2_rsa_encrypt("pw", NONCE, b"-----BEGIN PUBLIC KEY-----\ngarbage\n")


# ------------------------------------------------------------------------------------------
# ClientAuth against a scripted server
# ------------------------------------------------------------------------------------------


def stored_native(pw: str) -> bytes:
    return sha1(sha1(pw.encode()))


def native_ok(token: bytes, pw: str, nonce: bytes) -> bool:
    s2 = stored_native(pw)
    return sha1(xor(token, sha1(nonce + s2))) == s2


def sha2_ok(token: bytes, pw: str, nonce: bytes) -> bool:
    p2 = hashlib.sha256(hashlib.sha256(pw.encode()).digest()).digest()
    return hashlib.sha256(xor(token, hashlib.sha256(p2 + nonce).digest())).digest() == p2


OK = b"\x00\x00\x00\x02\x00\x00\x00"


def test_native_plain() -> None:
    auth = m.ClientAuth("alice", "pw1", "shop", ssl=False, connect_attrs={"program_name": "wardgate"})
    out = one(auth.receive(pkt(0, mariadb_greeting())))
    assert out.seq == 1 and auth.state == "auth"
    resp = m.HandshakeResponse41.parse(out.payload)
    assert resp.username == "alice" and resp.database == "shop"
    assert resp.auth_plugin_name == "mysql_native_password"
    assert resp.connect_attrs == {"program_name": "wardgate"}
    assert not resp.capabilities & m.CLIENT_SSL
    assert native_ok(resp.auth_response, "pw1", NONCE)
    assert auth.receive(pkt(2, OK)) == b""
    assert auth.done and auth.ok == m.OkPacket() and auth.error is None
    with pytest.raises(RuntimeError, match="state 'done'"):
        auth.receive(pkt(3, OK))


def test_caps_are_intersected() -> None:
    auth = m.ClientAuth(
        "alice", "pw", None, ssl=False, capabilities=m.DEFAULT_CLIENT_CAPABILITIES | m.CLIENT_COMPRESS
    )
    auth.on_greeting(m.HandshakeV10.parse(mysql8_greeting()))
    caps = auth.capabilities
    assert caps & m.CLIENT_PROTOCOL_41 and caps & m.CLIENT_DEPRECATE_EOF
    assert not caps & (m.CLIENT_COMPRESS | m.CLIENT_SSL | m.CLIENT_CONNECT_WITH_DB | m.CLIENT_CONNECT_ATTRS)
    assert not caps & m.CLIENT_QUERY_ATTRIBUTES  # not asked for


def test_tls_then_caching_sha2_fast_path() -> None:
    auth = m.ClientAuth("alice", "pw2", None, ssl=True)
    out = one(auth.on_greeting(m.HandshakeV10.parse(mysql8_greeting())))
    assert auth.state == "tls" and out.seq == 1 and len(out.payload) == 32
    req = m.SSLRequest.parse(out.payload)
    assert req.capabilities & m.CLIENT_SSL
    with pytest.raises(RuntimeError):
        auth.receive(pkt(2, OK))
    out = one(auth.tls_established())
    assert out.seq == 2
    resp = m.HandshakeResponse41.parse(out.payload)
    assert resp.capabilities == req.capabilities
    assert resp.auth_plugin_name == "caching_sha2_password"
    assert sha2_ok(resp.auth_response, "pw2", NONCE)
    assert auth.receive(pkt(3, b"\x01\x03")) == b""
    assert auth.state == "auth"
    assert auth.receive(pkt(4, OK)) == b""
    assert auth.done


def test_caching_sha2_full_auth_over_tls() -> None:
    auth = m.ClientAuth("alice", "pw3", None, ssl=True)
    auth.receive(pkt(0, mysql8_greeting()))
    auth.tls_established()
    out = one(auth.receive(pkt(3, b"\x01\x04")))
    assert (out.seq, out.payload) == (4, b"pw3\0")
    auth.receive(pkt(5, OK))
    assert auth.done


def test_caching_sha2_full_auth_rsa(rsa_key: rsa.RSAPrivateKey) -> None:
    auth = m.ClientAuth("alice", "pw4", None, ssl=False)
    out = one(auth.receive(pkt(0, mysql8_greeting())))
    assert out.seq == 1
    out = one(auth.receive(pkt(2, b"\x01\x04")))
    assert (out.seq, out.payload) == (3, b"\x02")  # request the public key
    out = one(auth.receive(pkt(4, b"\x01" + pem(rsa_key))))
    assert out.seq == 5
    assert rsa_decrypt(rsa_key, out.payload, NONCE) == b"pw4\0"
    auth.receive(pkt(6, OK))
    assert auth.done


def test_auth_switch_to_native() -> None:
    new_nonce = b"N" * 20
    auth = m.ClientAuth("alice", "pw5", None, ssl=False)
    auth.receive(pkt(0, mysql8_greeting()))
    out = one(auth.receive(pkt(2, b"\xfemysql_native_password\x00" + new_nonce + b"\x00")))
    assert out.seq == 3 and native_ok(out.payload, "pw5", new_nonce)
    assert auth.plugin == "mysql_native_password"
    auth.receive(pkt(4, OK))
    assert auth.done


def test_auth_switch_to_caching_sha2_then_full_auth() -> None:
    new_nonce = b"M" * 20
    auth = m.ClientAuth("alice", "pw6", None, ssl=True)
    auth.receive(pkt(0, mariadb_greeting()))
    auth.tls_established()
    out = one(auth.receive(pkt(3, b"\xfecaching_sha2_password\x00" + new_nonce + b"\x00")))
    assert out.seq == 4 and sha2_ok(out.payload, "pw6", new_nonce)
    out = one(auth.receive(pkt(5, b"\x01\x04")))
    assert (out.seq, out.payload) == (6, b"pw6\0")
    auth.receive(pkt(7, OK))
    assert auth.done


def test_auth_switch_empty_password() -> None:
    auth = m.ClientAuth("certuser", None, None, ssl=True)
    auth.receive(pkt(0, mysql8_greeting()))
    resp = m.HandshakeResponse41.parse(one(auth.tls_established()).payload)
    assert resp.auth_response == b""
    out = one(auth.receive(pkt(3, b"\xfemysql_native_password\x00" + NONCE + b"\x00")))
    assert (out.seq, out.payload) == (4, b"")  # an empty packet, still sent
    auth.receive(pkt(5, OK))
    assert auth.done


def test_server_error() -> None:
    auth = m.ClientAuth("alice", "wrong", None, ssl=False)
    auth.receive(pkt(0, mysql8_greeting()))
    msg = b"Access denied for user 'alice'@'10.0.0.1' (using password: YES)"
    assert auth.receive(pkt(2, b"\xff\x15\x04#28000" + msg)) == b""
    assert auth.failed and not auth.done
    assert auth.error == m.ErrPacket(1045, "28000", msg.decode())


def test_error_instead_of_greeting() -> None:
    auth = m.ClientAuth("alice", "pw", None, ssl=True)
    auth.receive(pkt(0, b"\xff\x10\x04Too many connections"))
    assert auth.failed and auth.error is not None and auth.error.code == 1040


def test_auth_protocol_violations() -> None:
    no_ssl = m.HandshakeV10.parse(mysql8_greeting(caps=MYSQL8_CAPS & ~m.CLIENT_SSL))
    with pytest.raises(ProtocolError, match="does not support TLS") as info:
        m.ClientAuth("a", "b", None, ssl=True).on_greeting(no_ssl)
    assert info.value.kind == "no_tls"

    auth = m.ClientAuth("a", "b", None, ssl=False)
    auth.receive(pkt(0, mariadb_greeting()))
    with pytest.raises(ProtocolError, match="unexpected AuthMoreData"):
        auth.receive(pkt(2, b"\x01\x03"))  # fast-auth marker, but we are on native

    auth = m.ClientAuth("a", "b", None, ssl=False)
    auth.receive(pkt(0, mariadb_greeting()))
    with pytest.raises(ProtocolError, match="mysql_clear_password without TLS"):
        auth.receive(pkt(2, b"\xfemysql_clear_password\x00"))

    auth = m.ClientAuth("a", "b", None, ssl=False)
    auth.receive(pkt(0, mariadb_greeting()))
    with pytest.raises(ProtocolError, match="unsupported auth plugin 'client_ed25519'"):
        auth.receive(pkt(2, b"\xfeclient_ed25519\x00" + b"x" * 32))

    auth = m.ClientAuth("a", "b", None, ssl=False)
    auth.receive(pkt(0, mariadb_greeting()))
    with pytest.raises(ProtocolError, match="sequence 5, expected 2"):
        auth.receive(pkt(5, OK))

    auth = m.ClientAuth("a", "b", None, ssl=False)
    auth.receive(pkt(0, mariadb_greeting()))
    with pytest.raises(ProtocolError, match=r"pre-4\.1"):
        auth.receive(pkt(2, b"\xfe"))


def test_clear_password_over_tls() -> None:
    auth = m.ClientAuth("a", "pw7", None, ssl=True)
    auth.receive(pkt(0, mariadb_greeting()))
    auth.tls_established()
    out = one(auth.receive(pkt(3, b"\xfemysql_clear_password\x00")))
    assert out.payload == b"pw7\0"


# ------------------------------------------------------------------------------------------
# Commands
# ------------------------------------------------------------------------------------------


def test_parse_simple_commands() -> None:
    assert m.parse_command("\x03SELECT 'é'".encode()) == m.Query("SELECT 'é'")
    assert m.parse_command(b"\x02shop") == m.InitDB("shop")
    assert m.parse_command(b"\x16SELECT ?") == m.StmtPrepare("SELECT ?")
    assert m.parse_command(b"\x17\x05\x00\x00\x00\x00\x01\x00\x00\x00rest") == m.StmtExecute(5, 0, b"rest", 1)
    assert m.parse_command(b"\x19\x05\x00\x00\x00") == m.StmtClose(5)
    assert m.parse_command(b"\x1a\x05\x00\x00\x00") == m.StmtReset(5)
    assert m.parse_command(b"\x18\x05\x00\x00\x00\x01\x00data") == m.StmtSendLongData(5, 1, b"data")
    assert m.parse_command(b"\x11root\x00\x14" + bytes(20)) == m.ChangeUser("root")
    assert m.parse_command(b"\x01") == m.Quit()
    assert m.parse_command(b"\x0e") == m.Ping()
    assert m.parse_command(b"\x1f") == m.ResetConnection()
    assert m.parse_command(b"\x04users\x00%") == m.FieldList("users", "%")
    assert m.parse_command(b"\x09") == m.OtherCommand(m.COM_STATISTICS, b"")
    assert m.parse_command(b"\x03x").name == "COM_QUERY"
    assert m.OtherCommand(0x99).name == "COM_0x99"
    assert m.COM_CHANGE_USER == 17 and m.COM_STMT_SEND_LONG_DATA == 24 and m.COM_RESET_CONNECTION == 31


def test_query_attributes() -> None:
    qa = m.CLIENT_QUERY_ATTRIBUTES
    assert m.parse_command(b"\x03\x00\x01SELECT 1", qa) == m.Query("SELECT 1")
    # Without the capability the same bytes are SQL.
    assert m.parse_command(b"\x03\x00\x01SELECT 1").sql == "\x00\x01SELECT 1"
    body = (
        b"\x02\x01"  # two attributes, one set
        + b"\x00"  # null bitmap
        + b"\x01"  # types follow
        + bytes([m.TYPE_STRING, 0])
        + lstr("traceparent")
        + bytes([m.TYPE_LONGLONG, 0x80])
        + lstr("n")
        + lstr("00-abc-01")
        + struct.pack("<Q", 7)
    )
    q = m.parse_command(b"\x03" + body + b"SELECT 2", qa)
    assert q == m.Query("SELECT 2", (("traceparent", "00-abc-01"), ("n", 7)))
    with pytest.raises(ProtocolError, match="without types"):
        m.parse_command(b"\x03\x01\x01\x00\x00SELECT 3", qa)


def test_command_errors() -> None:
    with pytest.raises(ProtocolError, match="empty packet"):
        m.parse_command(b"")
    with pytest.raises(ProtocolError, match="COM_STMT_EXECUTE: iteration_count runs past"):
        m.parse_command(b"\x17\x05\x00\x00\x00\x00\x01")
    with pytest.raises(ProtocolError, match="COM_STMT_CLOSE: statement_id"):
        m.parse_command(b"\x19\x05")
    with pytest.raises(ProtocolError, match="schema name is not valid UTF-8"):
        m.parse_command(b"\x02sh\xffop")
    with pytest.raises(ProtocolError, match="user is not valid UTF-8"):
        m.parse_command(b"\x11r\xfft\x00")


# ------------------------------------------------------------------------------------------
# Prepared statements
# ------------------------------------------------------------------------------------------

COLDEF = b"\x03def\x00\x00\x00\x01?\x00\x0c\x3f\x00\x00\x00\x00\x00\xfd\x80\x00\x00\x00\x00"
EOF = b"\xfe\x00\x00\x02\x00"


def prepare_ok(stmt_id: int, params: int, cols: int) -> bytes:
    return b"\x00" + struct.pack("<IHHBH", stmt_id, cols, params, 0, 0)


def prepared(tracker: m.StatementTracker, stmt_id: int, sql: str, params: int, cols: int = 0) -> None:
    tracker.observe(m.parse_command(b"\x16" + sql.encode()))
    assert tracker.awaiting_prepare
    st_ = tracker.feed_server(prepare_ok(stmt_id, params, cols))
    assert st_ is not None and st_.stmt_id == stmt_id
    eof = 0 if tracker.capabilities & m.CLIENT_DEPRECATE_EOF else 1
    for _ in range((params + eof if params else 0) + (cols + eof if cols else 0)):
        assert tracker.awaiting_prepare
        assert tracker.feed_server(COLDEF) is None
    assert not tracker.awaiting_prepare


def execute(
    stmt_id: int,
    params: list[tuple[int, bool, bytes | None]],
    *,
    bound: bool = True,
    flags: int = 0,
    count: int | None = None,
    names: list[str] | None = None,
) -> m.StmtExecute:
    out = bytes([m.COM_STMT_EXECUTE]) + struct.pack("<IBI", stmt_id, flags, 1)
    if count is not None:
        out += lenenc(count)
    bitmap = bytearray((len(params) + 7) // 8)
    for i, (_, _, v) in enumerate(params):
        if v is None:
            bitmap[i // 8] |= 1 << (i % 8)
    out += bytes(bitmap) + bytes([1 if bound else 0])
    if bound:
        for i, (t, unsigned, _) in enumerate(params):
            out += bytes([t, 0x80 if unsigned else 0])
            if names is not None:
                out += lstr(names[i])
    for _, _, v in params:
        if v is not None:
            out += v
    cmd = m.parse_command(out)
    assert isinstance(cmd, m.StmtExecute)
    return cmd


VALUE_CASES = [
    (m.TYPE_TINY, False, b"\xfb", -5),
    (m.TYPE_TINY, True, b"\xfb", 251),
    (m.TYPE_SHORT, False, struct.pack("<h", -2), -2),
    (m.TYPE_YEAR, True, struct.pack("<H", 2024), 2024),
    (m.TYPE_LONG, False, struct.pack("<i", -123456789), -123456789),
    (m.TYPE_INT24, False, struct.pack("<i", 8_000_000), 8_000_000),
    (m.TYPE_LONGLONG, True, b"\xff" * 8, 2**64 - 1),
    (m.TYPE_LONGLONG, False, b"\xff" * 8, -1),
    (m.TYPE_FLOAT, False, struct.pack("<f", 1.5), 1.5),
    (m.TYPE_DOUBLE, False, struct.pack("<d", -2.25), -2.25),
    (m.TYPE_NULL, False, b"", None),
    (m.TYPE_STRING, False, lstr("héllo"), "héllo"),
    (m.TYPE_VAR_STRING, False, lstr(b"\xff\xfe"), b"\xff\xfe"),
    (m.TYPE_VARCHAR, False, lstr("x" * 300), "x" * 300),
    (m.TYPE_JSON, False, lstr('{"a": 1}'), '{"a": 1}'),
    (m.TYPE_ENUM, False, lstr("red"), "red"),
    (m.TYPE_BLOB, False, lstr(b"\x00\x01\x02"), b"\x00\x01\x02"),
    (m.TYPE_LONG_BLOB, False, lstr(b""), b""),
    (m.TYPE_BIT, False, lstr(b"\x05"), b"\x05"),
    (m.TYPE_NEWDECIMAL, False, lstr("12.50"), "12.50"),
    (m.TYPE_DECIMAL, False, lstr("-0.1"), "-0.1"),
    (m.TYPE_DATE, False, b"\x04" + struct.pack("<HBB", 2024, 2, 29), dt.date(2024, 2, 29)),
    (m.TYPE_DATE, False, b"\x00", "0000-00-00"),
    (m.TYPE_DATETIME, False, b"\x00", "0000-00-00 00:00:00"),
    (m.TYPE_DATETIME, False, b"\x04" + struct.pack("<HBB", 2024, 1, 2), dt.datetime(2024, 1, 2)),
    (
        m.TYPE_DATETIME,
        False,
        b"\x07" + struct.pack("<HBBBBB", 2024, 1, 2, 3, 4, 5),
        dt.datetime(2024, 1, 2, 3, 4, 5),
    ),
    (
        m.TYPE_TIMESTAMP,
        False,
        b"\x0b" + struct.pack("<HBBBBBI", 2024, 1, 2, 3, 4, 5, 678),
        dt.datetime(2024, 1, 2, 3, 4, 5, 678),
    ),
    (m.TYPE_TIME, False, b"\x00", dt.timedelta(0)),
    (
        m.TYPE_TIME,
        False,
        b"\x08" + struct.pack("<BIBBB", 1, 1, 2, 3, 4),
        -dt.timedelta(days=1, hours=2, minutes=3, seconds=4),
    ),
    (
        m.TYPE_TIME,
        False,
        b"\x0c" + struct.pack("<BIBBBI", 0, 0, 10, 0, 0, 5),
        dt.timedelta(hours=10, microseconds=5),
    ),
]


@pytest.mark.parametrize(("type_code", "unsigned", "wire", "expected"), VALUE_CASES)
def test_execute_value(type_code: int, unsigned: bool, wire: bytes, expected: object) -> None:
    tracker = m.StatementTracker()
    prepared(tracker, 1, "SELECT ?, ?", 2, 2)
    cmd = execute(1, [(type_code, unsigned, wire), (m.TYPE_LONG, False, struct.pack("<i", 99))])
    values = tracker.observe(cmd)
    assert values == [expected, 99]
    assert type(values[0]) is type(expected)


def test_execute_null_bitmap_and_remembered_types() -> None:
    tracker = m.StatementTracker(capabilities=m.CLIENT_DEPRECATE_EOF)
    prepared(tracker, 7, "INSERT INTO t VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", 10, 0)
    params = [(m.TYPE_LONG, False, struct.pack("<i", i)) for i in range(10)]
    params[0] = (m.TYPE_LONG, False, None)
    params[9] = (m.TYPE_LONG, False, None)
    assert tracker.observe(execute(7, params)) == [None, 1, 2, 3, 4, 5, 6, 7, 8, None]
    # Second execute: new-params-bound = 0, the types from the first one apply.
    again = [(m.TYPE_LONG, False, struct.pack("<i", -i)) for i in range(10)]
    assert tracker.observe(execute(7, again, bound=False)) == [0, -1, -2, -3, -4, -5, -6, -7, -8, -9]
    st_ = tracker.get(7)
    assert st_ is not None and st_.sql.startswith("INSERT") and st_.num_params == 10


def test_execute_without_types_ever_bound() -> None:
    tracker = m.StatementTracker()
    prepared(tracker, 1, "SELECT ?", 1)
    with pytest.raises(ProtocolError, match="without types"):
        tracker.observe(execute(1, [(m.TYPE_LONG, False, b"\x01\x00\x00\x00")], bound=False))


def test_execute_no_params_unknown_and_closed() -> None:
    tracker = m.StatementTracker()
    prepared(tracker, 1, "SELECT 1", 0, 1)
    assert tracker.observe(m.parse_command(b"\x17\x01\x00\x00\x00\x00\x01\x00\x00\x00")) == []
    assert tracker.observe(execute(99, [])) is None
    tracker.observe(m.StmtClose(1))
    assert tracker.get(1) is None and len(tracker) == 0


def test_prepare_error_and_eof_counting() -> None:
    tracker = m.StatementTracker()
    tracker.observe(m.StmtPrepare("SELEC"))
    assert tracker.feed_server(b"\xff\x28\x04#42000You have an error") is None
    assert not tracker.awaiting_prepare
    # Columns only, with EOF: 2 defs + EOF.
    tracker.observe(m.StmtPrepare("SELECT a, b FROM t"))
    assert tracker.feed_server(prepare_ok(3, 0, 2)) is not None
    for _ in range(2):
        tracker.feed_server(COLDEF)
    assert tracker.awaiting_prepare
    tracker.feed_server(EOF)
    assert not tracker.awaiting_prepare
    with pytest.raises(ProtocolError, match="no COM_STMT_PREPARE pending"):
        tracker.feed_server(prepare_ok(4, 0, 0))


def test_execute_with_query_attributes() -> None:
    caps = m.CLIENT_QUERY_ATTRIBUTES
    tracker = m.StatementTracker(capabilities=caps)
    prepared(tracker, 2, "SELECT ?", 1)
    cmd = execute(
        2,
        [(m.TYPE_STRING, False, lstr("v")), (m.TYPE_STRING, False, lstr("trace-1"))],
        flags=m.PARAMETER_COUNT_AVAILABLE,
        count=2,
        names=["", "traceparent"],
    )
    assert tracker.observe(cmd) == ["v"]
    # No statement parameters, only an attribute.
    prepared(tracker, 3, "SELECT 1", 0)
    cmd = execute(3, [(m.TYPE_LONG, False, b"\x01\x00\x00\x00")], flags=8, count=1, names=["a"])
    assert tracker.observe(cmd) == []
    with pytest.raises(ProtocolError, match="0 parameters sent for a statement with 1"):
        tracker.observe(execute(2, [], flags=8, count=0))


def test_long_data_and_mariadb_last_statement() -> None:
    tracker = m.StatementTracker()
    prepared(tracker, 5, "INSERT INTO files VALUES (?, ?)", 2)
    tracker.observe(m.parse_command(b"\x18\x05\x00\x00\x00\x01\x00" + b"A" * 200))
    tracker.observe(m.parse_command(b"\x18\x05\x00\x00\x00\x01\x00" + b"B" * 200))
    # Long-data parameters are absent from the execute packet.
    cmd = execute(
        m.STMT_ID_LAST_PREPARED, [(m.TYPE_LONG, False, b"\x07\x00\x00\x00"), (m.TYPE_BLOB, False, b"")]
    )
    values = tracker.observe(cmd)
    assert values is not None
    assert values[0] == 7
    assert values[1] == m.LongData(400, b"A" * 200 + b"B" * 56)
    text = m.describe_params(values, max_len=50)
    assert text[1] == "A" * 50 + "…[truncated 350 bytes]"
    # Cleared after the execute: the next one carries the value inline.
    cmd = execute(5, [(m.TYPE_LONG, False, b"\x07\x00\x00\x00"), (m.TYPE_BLOB, False, lstr(b"z"))])
    assert tracker.observe(cmd) == [7, b"z"]


def test_tracker_is_bounded() -> None:
    tracker = m.StatementTracker(max_statements=1000)
    for i in range(1, 1101):
        tracker.prepare_sent(f"SELECT {i}")
        tracker.feed_server(prepare_ok(i, 0, 0))
    assert len(tracker) == 1000
    assert tracker.get(1) is None and tracker.get(100) is None and tracker.get(101) is not None
    tracker.get(101)  # recently used: survives the next eviction
    tracker.prepare_sent("SELECT x")
    tracker.feed_server(prepare_ok(5000, 0, 0))
    assert tracker.get(101) is not None and tracker.get(102) is None
    tracker.observe(m.ResetConnection())
    assert len(tracker) == 0


def test_describe_params() -> None:
    values = [
        None,
        5,
        -1.5,
        "short",
        "é" * 300,
        b"\x00\x01\xff",
        bytes(range(256)),
        b"plain text",
        dt.date(2024, 2, 29),
        dt.datetime(2024, 1, 2, 3, 4, 5, 6),
        -dt.timedelta(days=1, hours=2, minutes=3, seconds=4),
        "0000-00-00",
    ]
    out = m.describe_params(values, max_len=20)
    assert out[:4] == ["NULL", "5", "-1.5", "short"]
    assert out[4] == "é" * 20 + "…[truncated 560 bytes]"
    assert out[5] == "0x0001ff"
    assert out[6] == "0x" + bytes(range(9)).hex() + "…[truncated 247 bytes]"
    assert out[7] == "plain text"
    assert out[8:] == ["2024-02-29", "2024-01-02 03:04:05.000006", "-26:03:04", "0000-00-00"]
    assert m.describe_params(["x" * 256]) == ["x" * 256]
    assert m.describe_params(["x" * 257]) == ["x" * 256 + "…[truncated 1 bytes]"]


# ------------------------------------------------------------------------------------------
# Garbage in: only ProtocolError out
# ------------------------------------------------------------------------------------------


def parse_everything(payload: bytes) -> None:
    parsers = [
        m.HandshakeV10.parse,
        m.HandshakeResponse41.parse,
        m.SSLRequest.parse,
        m.parse_client_handshake,
        m.parse_auth_reply,
        lambda p: m.parse_auth_reply(p, m.CLIENT_PROTOCOL_41 | m.CLIENT_SESSION_TRACK),
        m.ErrPacket.parse,
        m.EofPacket.parse,
        m.AuthSwitchRequest.parse,
        m.AuthMoreData.parse,
        m.StmtPrepareOk.parse,
        m.parse_command,
        lambda p: m.parse_command(p, m.CLIENT_QUERY_ATTRIBUTES),
        m.read_lenenc_int,
        m.read_lenenc_str,
    ]
    for parse in parsers:
        with contextlib.suppress(ProtocolError):
            parse(payload)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=400), cuts=st.lists(st.integers(0, 1000), max_size=10))
def test_garbage_in_chunks(data: bytes, cuts: list[int]) -> None:
    reader = m.PacketReader(max_packet=300)
    with contextlib.suppress(ProtocolError):
        for piece in chunked(data, cuts):
            for p in reader.feed(piece):
                parse_everything(p.payload)
    parse_everything(data)


@settings(max_examples=400, deadline=None)
@given(
    params=st.binary(max_size=120), flags=st.integers(0, 255), qa=st.booleans(), bound_before=st.booleans()
)
def test_garbage_execute_params(params: bytes, flags: int, qa: bool, bound_before: bool) -> None:
    tracker = m.StatementTracker(capabilities=m.CLIENT_QUERY_ATTRIBUTES if qa else 0)
    tracker.prepare_sent("SELECT ?, ?, ?")
    tracker.feed_server(prepare_ok(1, 3, 0))
    if bound_before:
        st_ = tracker.get(1)
        assert st_ is not None
        st_.param_types = [(m.TYPE_DATETIME, False), (m.TYPE_TIME, False), (m.TYPE_BLOB, False)]
    try:
        values = tracker.decode_execute(m.StmtExecute(1, flags, params))
    except ProtocolError:
        return
    assert values is not None
    m.describe_params(values, max_len=10)


@settings(max_examples=300, deadline=None)
@given(
    replies=st.lists(st.binary(max_size=80), min_size=1, max_size=6),
    greeting=st.sampled_from([mysql8_greeting(), mariadb_greeting()]),
    ssl=st.booleans(),
)
def test_garbage_auth_replies(replies: list[bytes], greeting: bytes, ssl: bool) -> None:
    auth = m.ClientAuth("alice", "pw", "db", ssl=ssl)
    auth.receive(pkt(0, greeting))
    if ssl:
        auth.tls_established()
    seq = 3 if ssl else 2
    with contextlib.suppress(ProtocolError):
        for r in replies:
            if auth.done or auth.failed:
                break
            out = auth.receive(pkt(seq, r))
            seq = (seq + 1 + (1 if out else 0)) & 0xFF


def test_truncated_valid_execute_packets() -> None:
    tracker = m.StatementTracker()
    prepared(tracker, 1, "SELECT ?, ?", 2)
    for tc, unsigned, wire, _ in VALUE_CASES:
        cmd = execute(1, [(tc, unsigned, wire), (m.TYPE_DATETIME, False, b"\x07" + bytes(7))])
        for cut in range(len(cmd.params)):
            with contextlib.suppress(ProtocolError):
                tracker.decode_execute(m.StmtExecute(1, 0, cmd.params[:cut]))


# ------------------------------------------------------------------------------------------
# A real MariaDB (optional)
# ------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Conn:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.reader = m.PacketReader()
        self.queue: list[m.Packet] = []

    def next(self) -> m.Packet:
        while not self.queue:
            data = self.sock.recv(65536)
            assert data, "server closed the connection"
            self.queue += self.reader.feed(data)
        return self.queue.pop(0)

    def login(self, user: str, password: str) -> m.ClientAuth:
        auth = m.ClientAuth(user, password, None, ssl=False, connect_attrs={"program_name": "wardgate-test"})
        while not (auth.done or auth.failed):
            out = auth.receive(self.next())
            if out:
                self.sock.sendall(out)
        return auth

    def until_end(self) -> list[m.Packet]:
        """Packets of a result set, up to the terminating OK/EOF (0xfe) after the rows."""
        got = [self.next()]
        if got[0].payload[:1] in (b"\x00", b"\xff"):
            return got
        while True:
            p = self.next()
            got.append(p)
            if p.payload[:1] == b"\xfe" and len(p.payload) < 0xFFFFFF and len(got) > 2:
                return got


@pytest.fixture(scope="module")
def mariadb(tmp_path_factory: pytest.TempPathFactory):
    if not (shutil.which("mariadbd") and shutil.which("mariadb-install-db")):
        pytest.skip("MariaDB is not installed")
    base: Path = tmp_path_factory.mktemp("mariadb")
    datadir, sock = base / "data", base / "mysqld.sock"
    as_root = ["--user=root"] if os.geteuid() == 0 else []
    init = base / "init.sql"
    init.write_text("CREATE USER 'ward'@'%' IDENTIFIED BY 'ward-secret';\nGRANT ALL ON *.* TO 'ward'@'%';\n")
    try:
        subprocess.run(
            [
                "mariadb-install-db",
                "--no-defaults",
                f"--datadir={datadir}",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
                *as_root,
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
    except (subprocess.SubprocessError, OSError) as e:
        pytest.skip(f"mariadb-install-db failed: {e}")
    port = _free_port()
    log = base / "error.log"
    proc = subprocess.Popen(
        [
            "mariadbd",
            "--no-defaults",
            f"--datadir={datadir}",
            f"--socket={sock}",
            f"--port={port}",
            "--bind-address=127.0.0.1",
            "--skip-name-resolve",
            f"--init-file={init}",
            f"--pid-file={base / 'mysqld.pid'}",
            f"--log-error={log}",
            "--innodb-buffer-pool-size=16M",
            *as_root,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                pytest.skip(f"mariadbd did not start within 30 s: {tail}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_real_mariadb(mariadb: int) -> None:
    conn = Conn(mariadb)
    auth = conn.login("ward", "ward-secret")
    assert auth.done, auth.error
    assert auth.greeting is not None and "MariaDB" in auth.greeting.server_version
    assert auth.plugin == "mysql_native_password"
    caps = auth.capabilities

    conn.sock.sendall(m.encode_packet(0, b"\x03SELECT 1"))
    res = conn.until_end()
    assert res[0].payload == b"\x01"  # one column
    rows = [p.payload for p in res[2:-1] if p.payload[:1] != b"\xfe"]
    assert rows == [b"\x011"]

    # Prepared statement: the tracker learns from the real PREPARE_OK, our test encoder executes.
    tracker = m.StatementTracker(capabilities=caps)
    prep = b"\x16SELECT ? + ?"
    tracker.observe(m.parse_command(prep, caps))
    conn.sock.sendall(m.encode_packet(0, prep))
    learned = None
    while tracker.awaiting_prepare:
        learned = tracker.feed_server(conn.next().payload) or learned
    assert learned is not None and learned.num_params == 2
    cmd = execute(
        learned.stmt_id,
        [(m.TYPE_LONGLONG, False, struct.pack("<q", 40)), (m.TYPE_LONGLONG, False, b"\x02" + bytes(7))],
    )
    assert tracker.observe(cmd) == [40, 2]
    wire = bytes([m.COM_STMT_EXECUTE]) + struct.pack("<IBI", cmd.stmt_id, cmd.flags, 1) + cmd.params
    conn.sock.sendall(m.encode_packet(0, wire))
    res = conn.until_end()
    assert res[0].payload[:1] != b"\xff", m.ErrPacket.parse(res[0].payload)
    conn.sock.sendall(m.encode_packet(0, b"\x01"))
    conn.sock.close()

    bad = Conn(mariadb).login("ward", "wrong")
    assert bad.failed and bad.error is not None
    assert (bad.error.code, bad.error.sqlstate) == (1045, "28000")
    assert "Access denied for user 'ward'" in bad.error.message
