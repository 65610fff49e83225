"""The ClientHello reader against real hellos from Python's ssl, their fragments, and garbage."""

from __future__ import annotations

import ssl

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wardgate.protocols.errors import ProtocolError
from wardgate.protocols.tls import (
    MAX_CLIENT_HELLO,
    ClientHello,
    ClientHelloReader,
    NeedMore,
    parse_client_hello,
)

LABEL = r"[a-z0-9]([a-z0-9-]{0,14}[a-z0-9])?"
hostnames = st.from_regex(rf"{LABEL}(\.{LABEL}){{1,3}}", fullmatch=True).filter(
    lambda h: not h.replace(".", "").isdigit()
)
alpn_ids = st.lists(
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-./", min_size=1, max_size=20),
    min_size=1,
    max_size=5,
    unique=True,
)
fast = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def real_hello(
    sni: str | None,
    alpn: list[str] | None = None,
    max_version: ssl.TLSVersion | None = None,
) -> bytes:
    """The exact bytes Python's ssl sends first, captured through memory BIOs."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # no CA store to load: hellos are cheap
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    if max_version is not None:
        ctx.maximum_version = max_version
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=sni)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def refragment(hello: bytes, sizes: list[int]) -> bytes:
    """Re-split the handshake message of a one-record hello into records of the given sizes."""
    assert hello[0] == 22
    version = hello[1:3]
    body = hello[5 : 5 + int.from_bytes(hello[3:5], "big")]
    out = bytearray()
    pos = 0
    i = 0
    while pos < len(body):
        n = max(1, sizes[i % len(sizes)]) if sizes else len(body)
        piece = body[pos : pos + n]
        out += b"\x16" + version + len(piece).to_bytes(2, "big") + piece
        pos += n
        i += 1
    return bytes(out)


HELLO = real_hello("node-1.example.com", ["ward-ssh-ping", "ward-ssh", "http/1.1"])


@fast
@given(sni=hostnames, alpn=alpn_ids)
def test_real_client_hello_gives_sni_and_alpn(sni: str, alpn: list[str]) -> None:
    hello = real_hello(sni, alpn)
    out = parse_client_hello(hello)
    assert isinstance(out, ClientHello)
    assert out.sni == sni
    assert out.alpn == alpn
    assert out.tls_versions[0] == "TLSv1.3"
    assert out.size == len(hello)


def test_ip_address_target_sends_no_sni_and_tls12_only_offers_tls12() -> None:
    out = parse_client_hello(real_hello("10.1.2.3", None, ssl.TLSVersion.TLSv1_2))
    assert isinstance(out, ClientHello)
    assert out.sni is None
    assert out.alpn == []
    assert out.tls_versions == ["TLSv1.2"]


@fast
@given(sni=hostnames, alpn=alpn_ids, data=st.data())
def test_truncated_hello_needs_more(sni: str, alpn: list[str], data: st.DataObject) -> None:
    hello = real_hello(sni, alpn)
    cut = data.draw(st.integers(min_value=0, max_value=len(hello) - 1))
    out = parse_client_hello(hello[:cut])
    assert isinstance(out, NeedMore)
    assert cut < out.needed <= len(hello)


@fast
@given(
    sni=hostnames, alpn=alpn_ids, sizes=st.lists(st.integers(1, 700), min_size=1, max_size=8), data=st.data()
)
def test_hello_spanning_several_records(
    sni: str, alpn: list[str], sizes: list[int], data: st.DataObject
) -> None:
    wire = refragment(real_hello(sni, alpn), sizes)
    out = parse_client_hello(wire + b"\x17\x03\x03\x00\x05early")  # trailing bytes are not ours
    assert isinstance(out, ClientHello)
    assert (out.sni, out.alpn, out.size) == (sni, alpn, len(wire))
    cut = data.draw(st.integers(min_value=0, max_value=len(wire) - 1))
    partial = parse_client_hello(wire[:cut])
    assert isinstance(partial, NeedMore) and cut < partial.needed <= len(wire)


def outcome(data: bytes) -> ClientHello | NeedMore | ProtocolError:
    """The parse result, or the ProtocolError it raised; anything else propagates and fails."""
    try:
        return parse_client_hello(data)
    except ProtocolError as exc:
        return exc


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_only_need_more_or_protocol_error(data: bytes) -> None:
    out = outcome(data)
    assert isinstance(out, NeedMore | ClientHello | ProtocolError)
    if isinstance(out, ProtocolError):
        assert out.kind in {"not_tls", "plain_http", "malformed", "oversized"}
        assert str(out)


@settings(max_examples=400, deadline=None)
@given(body=st.binary(max_size=400), version=st.sampled_from([b"\x03\x01", b"\x03\x03"]))
def test_random_hello_bodies_never_crash(body: bytes, version: bytes) -> None:
    """Past the record and handshake headers, straight into the body parser."""
    msg = b"\x01" + len(body).to_bytes(3, "big") + body
    wire = b"\x16" + version + len(msg).to_bytes(2, "big") + msg
    out = outcome(wire)
    assert isinstance(out, ClientHello) or (isinstance(out, ProtocolError) and out.kind == "malformed")


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_mutated_real_hello_never_crashes(data: st.DataObject) -> None:
    hello = bytearray(HELLO)
    for _ in range(data.draw(st.integers(1, 6))):
        i = data.draw(st.integers(0, len(hello) - 1))
        hello[i] = data.draw(st.integers(0, 255))
    assert isinstance(outcome(bytes(hello)), NeedMore | ClientHello | ProtocolError)


def test_incremental_reader_byte_by_byte() -> None:
    reader = ClientHelloReader()
    results = [reader.feed(HELLO[i : i + 1]) for i in range(len(HELLO))]
    assert all(isinstance(r, NeedMore) for r in results[:-1])
    final = results[-1]
    assert isinstance(final, ClientHello)
    assert final.sni == "node-1.example.com"
    assert final.alpn == ["ward-ssh-ping", "ward-ssh", "http/1.1"]
    assert reader.buffered == HELLO


@pytest.mark.parametrize(
    "first",
    [b"GET / HTTP/1.1\r\nHost: proxy\r\n\r\n", b"POST /webapi HTTP/1.1\r\n", b"OPTIONS * HTTP/1.1", b"GE"],
)
def test_plain_http_is_named(first: bytes) -> None:
    with pytest.raises(ProtocolError, match=r"looks like plain HTTP: use https://") as info:
        parse_client_hello(first)
    assert info.value.kind == "plain_http"


@pytest.mark.parametrize(
    ("first", "message"),
    [
        (b"SSH-2.0-OpenSSH_9.6\r\n", "plain SSH"),
        (b"\x00\x00\x00\x00garbage", "first byte is 0x00"),
        (b"\x16\x09\x00", "record version 9"),
        (b"\x80\x2e\x01\x03\x01", "SSLv2"),
    ],
)
def test_not_tls_is_named(first: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message) as info:
        parse_client_hello(first)
    assert info.value.kind == "not_tls"


def test_oversized_hello_is_refused_before_it_arrives() -> None:
    # A handshake header claiming 1 MiB: refused from the first nine bytes.
    wire = b"\x16\x03\x01\x40\x00" + b"\x01" + (1 << 20).to_bytes(3, "big")
    with pytest.raises(ProtocolError, match="too large") as info:
        parse_client_hello(wire)
    assert info.value.kind == "oversized"
    # A modest message in 1-byte records: the record headers push it past the cap.
    message = b"\x01\x00\x10\x00" + b"\x00" * 4096
    tiny = b"".join(b"\x16\x03\x01\x00\x01" + bytes([b]) for b in message)
    with pytest.raises(ProtocolError, match="too large") as info:
        parse_client_hello(tiny)
    assert info.value.kind == "oversized"
    assert MAX_CLIENT_HELLO == 16 * 1024


def test_non_handshake_record_and_wrong_message_type() -> None:
    with pytest.raises(ProtocolError, match="first handshake message has type 2"):
        parse_client_hello(b"\x16\x03\x03\x00\x04\x02\x00\x00\x00")
    half = refragment(HELLO, [100])
    with pytest.raises(ProtocolError, match="interrupted by a record of type 23"):
        parse_client_hello(half[:105] + b"\x17\x03\x03\x00\x10" + b"x" * 16)
