"""The PostgreSQL wire codec: round trips, real clients' bytes, upstream auth, audit, a real server."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import itertools
import os
import secrets
import shutil
import socket
import ssl
import struct
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wardgate.protocols import postgres as pg
from wardgate.protocols.errors import ProtocolError

# --------------------------------------------------------------------------------------------
# helpers


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


def feed_bytewise(reader: pg.FrontendReader | pg.BackendReader, data: bytes) -> list:
    out = []
    for i in range(len(data)):
        out += reader.feed(data[i : i + 1])
    return out


def typed_reader() -> pg.FrontendReader:
    r = pg.FrontendReader()
    assert [type(m) for m in r.feed(pg.startup_message({"user": "alice"}))] == [pg.StartupMessage]
    return r


def server_msgs(*items: bytes) -> list:
    return pg.BackendReader().feed(b"".join(items))


def reply(t: bytes, body: bytes = b"") -> pg.BackendMessage:
    (msg,) = server_msgs(pg.encode_message(t, body))
    return msg


# --------------------------------------------------------------------------------------------
# round trips of every encoder


FRONTEND_CASES = [
    (pg.password_message(b"hunter2"), pg.PasswordMessage, {"data": b"hunter2\0"}),
    (pg.sasl_response(b"c=biws,r=abc,p=xyz"), pg.PasswordMessage, {"data": b"c=biws,r=abc,p=xyz"}),
    (pg.query("SELECT 1; SELECT 'é'"), pg.Query, {"sql": "SELECT 1; SELECT 'é'"}),
    (pg.parse("s1", "SELECT $1::int", [23]), pg.Parse, {"statement": "s1", "param_types": (23,)}),
    (
        pg.bind("p1", "s1", [b"42", None, b"\x00\x01"], [0, 0, 1], [1]),
        pg.Bind,
        {"params": (b"42", None, b"\x00\x01"), "param_formats": (0, 0, 1), "result_formats": (1,)},
    ),
    (pg.execute("p1", 100), pg.Execute, {"portal": "p1", "max_rows": 100}),
    (pg.describe(b"S", "s1"), pg.Describe, {"kind": b"S", "name": "s1"}),
    (pg.describe(b"P"), pg.Describe, {"kind": b"P", "name": ""}),
    (pg.close(b"S", "s1"), pg.Close, {"kind": b"S", "name": "s1"}),
    (pg.sync(), pg.Sync, {}),
    (pg.flush(), pg.Flush, {}),
    (pg.copy_data(b"1\tapple\n"), pg.CopyData, {"data": b"1\tapple\n"}),
    (pg.copy_done(), pg.CopyDone, {}),
    (pg.copy_fail("aborted by user"), pg.CopyFail, {"message": "aborted by user"}),
    (
        pg.function_call(1598, [b"\x00\x00\x00\x07", None], [1], 1),
        pg.FunctionCall,
        {"oid": 1598, "args": (b"\x00\x00\x00\x07", None), "arg_formats": (1,), "result_format": 1},
    ),
    (pg.encode_message(b"x", b"future"), pg.UnknownMessage, {"type": b"x", "body": b"future"}),
    (pg.terminate(), pg.Terminate, {}),
]


def test_frontend_encoders_round_trip_whole_and_bytewise() -> None:
    wire = b"".join(w for w, _, _ in FRONTEND_CASES)
    for msgs in (typed_reader().feed(wire), feed_bytewise(typed_reader(), wire)):
        assert len(msgs) == len(FRONTEND_CASES)
        for msg, (w, cls, attrs) in zip(msgs, FRONTEND_CASES, strict=True):
            assert type(msg) is cls
            assert msg.raw == w
            for k, v in attrs.items():
                assert getattr(msg, k) == v, (cls, k)


def test_startup_packets_round_trip() -> None:
    params = {"user": "alice", "database": "shop", "application_name": "psql", "options": "-c search_path=x"}
    cases = [
        (pg.ssl_request(), pg.SSLRequest),
        (pg.gssenc_request(), pg.GSSENCRequest),
        (pg.startup_message(params), pg.StartupMessage),
    ]
    for wire, cls in cases:
        for msgs in (pg.FrontendReader().feed(wire), feed_bytewise(pg.FrontendReader(), wire)):
            assert [type(m) for m in msgs] == [cls]
            assert msgs[0].raw == wire
    (m,) = pg.FrontendReader().feed(pg.startup_message(params))
    assert m.params == params and list(m.params) == list(params)
    assert (m.version, m.version_str, m.user, m.database) == (196608, "3.0", "alice", "shop")
    (m,) = pg.FrontendReader().feed(pg.startup_message({"user": "bob"}, version=3 << 16 | 2))
    assert m.version_str == "3.2" and m.database == "bob"

    r = pg.FrontendReader()
    (c,) = r.feed(pg.cancel_request(4242, 0x1BADCAFE))
    assert isinstance(c, pg.CancelRequest) and (c.pid, c.secret) == (4242, b"\x1b\xad\xca\xfe")
    assert r.phase == "closed"
    long_key = secrets.token_bytes(32)  # protocol 3.2 keys
    (c,) = pg.FrontendReader().feed(pg.cancel_request(7, long_key))
    assert c.secret == long_key
    assert pg.cancel_request(1, -1)[-4:] == b"\xff\xff\xff\xff"


def test_password_message_helpers() -> None:
    (m,) = typed_reader().feed(pg.password_message(b"s3cret"))
    assert m.password() == "s3cret"
    assert "s3cret" not in repr(m)
    (m,) = typed_reader().feed(pg.sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=abc"))
    assert m.sasl_initial_response() == ("SCRAM-SHA-256", b"n,,n=,r=abc")
    (m,) = typed_reader().feed(pg.sasl_initial_response("SCRAM-SHA-256", None))
    assert m.sasl_initial_response() == ("SCRAM-SHA-256", None)
    assert m.sasl_response() == m.data
    (m,) = typed_reader().feed(pg.sasl_response(b"no-nul-here"))
    with pytest.raises(ProtocolError, match="NUL-terminated"):
        m.password()
    with pytest.raises(ProtocolError, match="SASLInitialResponse"):
        m.sasl_initial_response()


def test_backend_encoders_round_trip_whole_and_bytewise() -> None:
    wire_and_checks = [
        (pg.authentication_ok(), lambda m: (m.code, m.data) == (0, b"")),
        (pg.authentication_cleartext(), lambda m: m.code == pg.AUTH_CLEARTEXT),
        (pg.authentication_md5(b"\x01\x02\x03\x04"), lambda m: m.salt == b"\x01\x02\x03\x04"),
        (
            pg.authentication_sasl(["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]),
            lambda m: m.mechanisms == ("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"),
        ),
        (pg.authentication_sasl_continue(b"r=abc,s=c2FsdA==,i=4096"), lambda m: m.code == 11),
        (pg.authentication_sasl_final(b"v=xyz"), lambda m: (m.code, m.data) == (12, b"v=xyz")),
        (
            pg.parameter_status("server_version", "15.2"),
            lambda m: (m.name, m.value) == ("server_version", "15.2"),
        ),
        (pg.backend_key_data(1234, 0x0BADF00D), lambda m: (m.pid, m.secret) == (1234, b"\x0b\xad\xf0\x0d")),
        (pg.ready_for_query(), lambda m: m.status == b"I"),
        (pg.ready_for_query(b"T"), lambda m: m.status == b"T"),
        (
            pg.error_response("access to db denied", detail="role reader", hint="ask an admin"),
            lambda m: (
                isinstance(m, pg.ErrorResponse)
                and (m.severity, m.code, m.message, m.detail, m.hint)
                == ("FATAL", "28000", "access to db denied", "role reader", "ask an admin")
                and m.fields["S"] == "FATAL"
            ),
        ),
        (
            pg.notice_response("session is recorded", code="01000", severity="WARNING"),
            lambda m: isinstance(m, pg.NoticeResponse) and (m.code, m.severity) == ("01000", "WARNING"),
        ),
        (
            pg.encode_message(b"D", b"\x00\x01\x00\x00\x00\x01x"),
            lambda m: (
                isinstance(m, pg.BackendMessage) and (m.type, m.body) == (b"D", b"\x00\x01\x00\x00\x00\x01x")
            ),
        ),
    ]
    wire = b"".join(w for w, _ in wire_and_checks)
    for msgs in (pg.BackendReader().feed(wire), feed_bytewise(pg.BackendReader(), wire)):
        assert len(msgs) == len(wire_and_checks)
        for msg, (w, check) in zip(msgs, wire_and_checks, strict=True):
            assert msg.raw == w
            assert check(msg), msg
    # Only the fields given are sent: an error without detail/hint has S, V, C, M.
    (e,) = server_msgs(pg.error_response("no"))
    assert set(e.fields) == {"S", "V", "C", "M"}
    with pytest.raises(ValueError, match="MD5 salt"):
        server_msgs(pg.authentication_ok())[0].salt  # noqa: B018


def test_encoders_refuse_nul_and_bad_arguments() -> None:
    with pytest.raises(ValueError, match="NUL"):
        pg.query("SELECT '\0'")
    with pytest.raises(ValueError, match="NUL"):
        pg.startup_message({"user": "a\0b"})
    with pytest.raises(ValueError, match="NUL"):
        pg.password_message(b"a\0b")
    with pytest.raises(ValueError, match="kind"):
        pg.describe(b"X")
    with pytest.raises(ValueError, match="status"):
        pg.ready_for_query(b"Q")
    with pytest.raises(ValueError, match="one byte"):
        pg.encode_message(b"QQ")


# --------------------------------------------------------------------------------------------
# bytes real clients send, built by hand from the protocol docs


def be32(n: int) -> bytes:
    return struct.pack("!i", n)


def be16(n: int) -> bytes:
    return struct.pack("!h", n)


def test_psql_like_session() -> None:
    """psql 15 with sslmode=prefer: SSLRequest, then (after TLS) its startup packet and a query."""
    ssl_req = b"\x00\x00\x00\x08\x04\xd2\x16\x2f"
    body = b"\x00\x03\x00\x00user\0alice\0database\0shop\0application_name\0psql\0client_encoding\0UTF8\0\0"
    startup = be32(len(body) + 4) + body
    q = b"Q" + be32(4 + 16) + b"SELECT * FROM t\0"

    r = pg.FrontendReader()
    (m,) = r.feed(ssl_req)
    assert isinstance(m, pg.SSLRequest) and m.raw == ssl_req == pg.ssl_request()
    assert r.phase == "negotiating"
    r.expect_startup()  # the proxy answered 'S' and finished the TLS handshake
    msgs = r.feed(startup + q)
    assert isinstance(msgs[0], pg.StartupMessage)
    assert msgs[0].params == {
        "user": "alice",
        "database": "shop",
        "application_name": "psql",
        "client_encoding": "UTF8",
    }
    assert msgs[0].raw == startup
    assert isinstance(msgs[1], pg.Query) and msgs[1].sql == "SELECT * FROM t"
    assert r.phase == "typed"


def test_asyncpg_like_extended_query_and_tracker() -> None:
    """asyncpg prepares a named statement, learns its parameter types, then binds binary values."""
    name = b"__asyncpg_stmt_1__\0"
    sql = b"SELECT * FROM items WHERE id = $1 AND name = $2\0"
    parse_msg = b"P" + be32(4 + len(name) + len(sql) + 2) + name + sql + be16(0)
    describe_msg = b"D" + be32(4 + 1 + len(name)) + b"S" + name
    sync_msg = b"S\x00\x00\x00\x04"
    params = be16(2) + be32(4) + be32(42) + be32(4) + b"pear"
    bind_body = b"\0" + name + be16(2) + be16(1) + be16(0) + params + be16(1) + be16(1)
    bind_msg = b"B" + be32(4 + len(bind_body)) + bind_body
    execute_msg = b"E" + be32(4 + 1 + 4) + b"\0" + be32(0)

    r = typed_reader()
    first = r.feed(parse_msg + describe_msg + sync_msg)
    assert [type(m) for m in first] == [pg.Parse, pg.Describe, pg.Sync]
    assert first[0].statement == "__asyncpg_stmt_1__" and first[0].param_types == ()
    assert first[0].query == "SELECT * FROM items WHERE id = $1 AND name = $2"
    second = r.feed(bind_msg + execute_msg + sync_msg)
    b = second[0]
    assert isinstance(b, pg.Bind)
    assert (b.portal, b.statement, b.param_formats, b.params, b.result_formats) == (
        "",
        "__asyncpg_stmt_1__",
        (1, 0),
        (be32(42), b"pear"),
        (1,),
    )
    assert second[1] == pg.Execute("", 0, execute_msg)
    assert pg.bind("", "__asyncpg_stmt_1__", [be32(42), b"pear"], [1, 0], [1]) == bind_msg

    t = pg.ExtendedQueryTracker()
    for m in first:
        assert t.client(m) is None
    # ParseComplete, ParameterDescription (int4, text), NoData, ReadyForQuery
    param_desc = be16(2) + struct.pack("!II", 23, 25)
    for m in server_msgs(
        pg.encode_message(b"1"),
        pg.encode_message(b"t", param_desc),
        pg.encode_message(b"n"),
        pg.ready_for_query(),
    ):
        t.server(m)
    assert t.statement("__asyncpg_stmt_1__") == first[0].query and t.pending == 0
    bound = t.client(second[0])
    executed = t.client(second[1])
    want = ("SELECT * FROM items WHERE id = $1 AND name = $2", ("42", "pear"), True)
    assert bound is not None and (bound.query, bound.params, bound.certain) == want
    assert executed is not None and (executed.event, executed.query, executed.params) == (
        "execute",
        *want[:2],
    )


# --------------------------------------------------------------------------------------------
# errors


def test_oversized_negative_and_short_lengths() -> None:
    r = typed_reader()
    with pytest.raises(
        ProtocolError, match="message of 2147483647 bytes exceeds the 1048576-byte limit"
    ) as e:
        r.feed(b"Q\x7f\xff\xff\xff")
    assert e.value.kind == "oversized"
    with pytest.raises(ProtocolError, match="length -1; the minimum is 4"):
        typed_reader().feed(b"Q\xff\xff\xff\xff")
    with pytest.raises(ProtocolError, match="length 3"):
        typed_reader().feed(b"S\x00\x00\x00\x03")
    with pytest.raises(ProtocolError, match="exceeds the 100-byte limit"):
        pg.BackendReader(max_message=100).feed(pg.encode_message(b"D", b"x" * 97))
    assert len(pg.BackendReader(max_message=100).feed(pg.encode_message(b"D", b"x" * 96))) == 1
    with pytest.raises(ProtocolError, match="startup packet of 10001 bytes exceeds the 10000-byte limit"):
        pg.FrontendReader().feed(be32(10001))
    with pytest.raises(ProtocolError, match="startup packet length -8 is less than 8"):
        pg.FrontendReader().feed(be32(-8))
    with pytest.raises(ProtocolError, match="startup packet length 4"):
        pg.FrontendReader().feed(be32(4))


def test_truncated_input_waits_then_completes() -> None:
    wire = pg.query("SELECT 1")
    r = typed_reader()
    assert r.feed(wire[:-1]) == [] and r.in_message
    assert [m.sql for m in r.feed(wire[-1:])] == ["SELECT 1"]
    assert not r.in_message
    r = pg.FrontendReader()
    assert r.feed(pg.startup_message({"user": "a"})[:9]) == [] and r.in_message


def test_unknown_startup_versions() -> None:
    with pytest.raises(ProtocolError, match=r"unsupported frontend protocol 2\.0") as e:
        pg.FrontendReader().feed(be32(8) + be32(2 << 16))
    assert e.value.kind == "unsupported_version"
    with pytest.raises(ProtocolError, match=r"unknown startup request code 1234\.5681"):
        pg.FrontendReader().feed(be32(8) + be32(1234 << 16 | 5681))
    with pytest.raises(ProtocolError, match="SSLRequest message: 4 unexpected bytes"):
        pg.FrontendReader().feed(be32(12) + be32(pg.SSL_REQUEST_CODE) + b"xxxx")
    with pytest.raises(ProtocolError, match="secret key of 2 bytes"):
        pg.FrontendReader().feed(be32(14) + be32(pg.CANCEL_REQUEST_CODE) + be32(1) + b"ab")


def test_garbage_is_named() -> None:
    with pytest.raises(ProtocolError, match="plain HTTP") as e:
        pg.FrontendReader().feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert e.value.kind == "plain_http"
    with pytest.raises(ProtocolError, match="started TLS directly") as e:
        pg.FrontendReader().feed(b"\x16\x03\x01\x02\x00\x01")
    assert e.value.kind == "direct_tls"
    with pytest.raises(ProtocolError, match=r"startup packet of \d+ bytes exceeds"):
        pg.FrontendReader().feed(b"\x7e\xad\xbe\xef")
    with pytest.raises(ProtocolError, match="type byte 0x00"):
        typed_reader().feed(b"\x00\x00\x00\x00\x04")
    with pytest.raises(ProtocolError, match="backend message: type byte 0xff"):
        pg.BackendReader().feed(b"\xff")


def test_malformed_bodies() -> None:
    cases = [
        (pg.encode_message(b"Q", b"SELECT 1"), "Query message: string is not NUL-terminated"),
        (pg.encode_message(b"Q", b"SELECT 1\0extra"), "Query message: 5 unexpected bytes"),
        (pg.encode_message(b"S", b"x"), "Sync message: 1 bytes of body"),
        (pg.encode_message(b"D", b"Xname\0"), "neither 'S'"),
        (pg.encode_message(b"P", b"s\0SELECT\0" + be16(2) + be32(23)), "needs 8 more bytes, 4 left"),
        (pg.bind("", "", [b"1", b"2"], [0, 1, 0]), "3 parameter formats for 2 parameters"),
        (pg.bind("", "", [b"1"], [2]), "parameter format code 2"),
        (pg.bind("", "", [b"1"], [], [7]), "result format code 7"),
        (pg.encode_message(b"B", b"\0\0" + be16(0) + be16(1) + be32(-2)), "value length -2"),
        (pg.encode_message(b"B", b"\0\0" + be16(0) + be16(1) + be32(100) + b"x"), "needs 100 more bytes"),
        (pg.encode_message(b"E", b"portal\0"), "Execute message: needs 4 more bytes"),
    ]
    for wire, match in cases:
        with pytest.raises(ProtocolError, match=match):
            typed_reader().feed(wire)
    backend_cases = [
        (pg.encode_message(b"Z", b"Q"), "ReadyForQuery message: status b'Q'"),
        (pg.encode_message(b"R", be32(5) + b"abc"), "code 5 with 3 bytes of data, expected 4"),
        (pg.encode_message(b"R", be32(0) + b"x"), "code 0 with 1 bytes"),
        (pg.encode_message(b"R", be32(10) + b"SCRAM-SHA-256\0"), "AuthenticationSASL message"),
        (pg.encode_message(b"E", b"Mno terminator\0"), "ErrorResponse message"),
        (pg.encode_message(b"K", be32(1) + b"ab"), "secret key of 2 bytes"),
        (pg.encode_message(b"R", b"\0\0"), "Authentication message: needs 4 more bytes"),
    ]
    for wire, match in backend_cases:
        with pytest.raises(ProtocolError, match=match):
            pg.BackendReader().feed(wire)


def test_startup_params_are_strict() -> None:
    def packet(body: bytes) -> bytes:
        return be32(len(body) + 8) + be32(pg.PROTOCOL_VERSION) + body

    with pytest.raises(ProtocolError, match="given twice"):
        pg.FrontendReader().feed(packet(b"user\0a\0user\0b\0\0"))
    with pytest.raises(ProtocolError, match="is not UTF-8"):
        pg.FrontendReader().feed(packet(b"user\0\xff\0\0"))
    with pytest.raises(ProtocolError, match="not NUL-terminated"):
        pg.FrontendReader().feed(packet(b"user\0alice\0"))
    with pytest.raises(ProtocolError, match="1 unexpected bytes"):
        pg.FrontendReader().feed(packet(b"user\0alice\0\0x"))
    (m,) = pg.FrontendReader().feed(packet(b"\0"))
    assert m.params == {} and m.user is None


def test_no_bytes_may_precede_the_encryption_answer() -> None:
    """Bytes piggybacked on an SSLRequest could be injected by a man in the middle (CVE-2021-23214)."""
    with pytest.raises(ProtocolError, match="after its encryption request without waiting") as e:
        pg.FrontendReader().feed(pg.ssl_request() + pg.startup_message({"user": "a"}))
    assert e.value.kind == "unexpected_data"
    r = pg.FrontendReader()
    r.feed(pg.gssenc_request())
    with pytest.raises(ProtocolError, match="before the answer"):
        r.feed(b"\x00")
    # GSSENC refused, then SSL, then the startup packet: libpq's gssencmode=prefer dance.
    r = pg.FrontendReader()
    assert isinstance(r.feed(pg.gssenc_request())[0], pg.GSSENCRequest)
    r.expect_startup()
    assert isinstance(r.feed(pg.ssl_request())[0], pg.SSLRequest)
    r.expect_startup()
    assert isinstance(r.feed(pg.startup_message({"user": "a"}))[0], pg.StartupMessage)
    with pytest.raises(RuntimeError, match="typed phase"):
        r.expect_startup()


def test_nothing_after_terminate_or_cancel() -> None:
    with pytest.raises(ProtocolError, match="after Terminate"):
        typed_reader().feed(pg.terminate() + pg.query("SELECT 1"))
    r = typed_reader()
    r.feed(pg.terminate())
    with pytest.raises(ProtocolError, match="after ending the session"):
        r.feed(b"Q")
    with pytest.raises(ProtocolError, match="after its CancelRequest"):
        pg.FrontendReader().feed(pg.cancel_request(1, 2) + b"x")


def test_read_ssl_answer() -> None:
    assert pg.read_ssl_answer(b"S") is True
    assert pg.read_ssl_answer(ord("N")) is False
    with pytest.raises(ProtocolError, match="3 unexpected bytes after its SSL answer"):
        pg.read_ssl_answer(b"Sabc")  # CVE-2021-23222: data before the handshake
    with pytest.raises(ProtocolError, match="with an error"):
        pg.read_ssl_answer(b"E")
    with pytest.raises(ProtocolError, match="0x48"):
        pg.read_ssl_answer(b"HTTP/1.1 400")
    with pytest.raises(ProtocolError, match="no SSL answer"):
        pg.read_ssl_answer(b"")


# --------------------------------------------------------------------------------------------
# property tests


@settings(max_examples=400, deadline=None)
@given(data=st.binary(max_size=600), cuts=st.lists(st.integers(0, 1 << 16), max_size=20), typed=st.booleans())
def test_arbitrary_frontend_bytes_only_raise_protocol_error(
    data: bytes, cuts: list[int], typed: bool
) -> None:
    r = typed_reader() if typed else pg.FrontendReader(max_message=4096)
    try:
        for piece in chunked(data, cuts):
            if r.phase == "negotiating":
                r.expect_startup()
            for m in r.feed(piece):
                if isinstance(m, pg.PasswordMessage):
                    for helper in (m.password, m.sasl_initial_response):
                        with contextlib.suppress(ProtocolError):
                            helper()
    except ProtocolError as e:
        error = str(e)
        assert error


@settings(max_examples=400, deadline=None)
@given(data=st.binary(max_size=600), cuts=st.lists(st.integers(0, 1 << 16), max_size=20))
def test_arbitrary_backend_bytes_only_raise_protocol_error(data: bytes, cuts: list[int]) -> None:
    r = pg.BackendReader(max_message=4096)
    t = pg.ExtendedQueryTracker()
    try:
        for piece in chunked(data, cuts):
            for m in r.feed(piece):
                t.server(m)
                if isinstance(m, pg.Authentication) and m.code == pg.AUTH_SASL:
                    assert isinstance(m.mechanisms, tuple)
    except ProtocolError as e:
        error = str(e)
        assert error


@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=200), t=st.sampled_from(b"QPBEDCSHXpdcfFx"))
def test_any_typed_body_only_raises_protocol_error(body: bytes, t: int) -> None:
    try:
        msgs = typed_reader().feed(pg.encode_message(bytes([t]), body))
    except ProtocolError:
        return
    assert len(msgs) == 1 and msgs[0].raw[5:] == body


sql_text = st.text(st.characters(exclude_characters="\0", exclude_categories=("Cs",)), max_size=300)
names = st.text(st.characters(exclude_characters="\0", exclude_categories=("Cs",)), max_size=30)


@st.composite
def bind_args(draw: st.DrawFn) -> tuple:
    params = draw(st.lists(st.one_of(st.none(), st.binary(max_size=50)), max_size=12))
    shape = draw(st.sampled_from(["none", "one", "each"]))
    fmt = st.integers(0, 1)
    formats = {"none": [], "one": [draw(fmt)], "each": [draw(fmt) for _ in params]}[shape]
    if shape == "each" and len(params) == 1:
        formats = formats[:1]
    results = draw(st.lists(fmt, max_size=5))
    return draw(names), draw(names), params, formats, results


@settings(max_examples=300, deadline=None)
@given(
    sql=sql_text,
    stmt=names,
    types=st.lists(st.integers(0, 2**32 - 1), max_size=10),
    b=bind_args(),
    cuts=st.lists(st.integers(0, 1 << 16), max_size=10),
)
def test_query_parse_bind_round_trip(
    sql: str, stmt: str, types: list[int], b: tuple, cuts: list[int]
) -> None:
    portal, bstmt, params, formats, results = b
    wire = pg.query(sql) + pg.parse(stmt, sql, types) + pg.bind(portal, bstmt, params, formats, results)
    r = typed_reader()
    msgs = [m for piece in chunked(wire, cuts) for m in r.feed(piece)]
    q, p, bd = msgs
    assert q.sql == sql
    assert (p.statement, p.query, p.param_types) == (stmt, sql, tuple(types))
    assert (bd.portal, bd.statement, bd.params) == (portal, bstmt, tuple(params))
    assert (bd.param_formats, bd.result_formats) == (tuple(formats), tuple(results))
    assert b"".join(m.raw for m in msgs) == wire
    described = pg.describe_params(bd.params, bd.param_formats, max_len=16)
    assert [d is None for d in described] == [v is None for v in params]


def test_names_with_bad_utf8_stay_distinct() -> None:
    """Two statement names that are not UTF-8 must not collapse into one (audit confusion)."""
    r = typed_reader()
    a, b = (pg.encode_message(b"P", n + b"\0SELECT 1\0" + be16(0)) for n in (b"\xff", b"\xfe"))
    pa, pb = r.feed(a + b)
    assert pa.statement != pb.statement
    assert pg.parse(pa.statement, "SELECT 1") == a


# --------------------------------------------------------------------------------------------
# upstream authentication


def test_md5_password_known_value() -> None:
    # The stored hash of user "postgres" / password "postgres" is the well-known md53175bce1d….
    salt = b"\x93\x0f\x32\x5a"
    assert pg.md5_password("postgres", "postgres", salt) == (
        b"md5"
        + hashlib.md5(b"3175bce1d3201d16594cebf9d7eb3f9d" + salt, usedforsecurity=False).hexdigest().encode()
    )


RFC7677 = {
    "client_first": b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO",
    "server_first": b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
    "client_final": b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
    b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
    "server_final": b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=",
}


def test_scram_rfc7677_vector() -> None:
    c = pg.ScramSha256Client("user", "pencil", nonce="rOprNGfwEbeRWgbNEkqO")
    assert c.client_first() == RFC7677["client_first"]
    assert c.client_final(RFC7677["server_first"]) == RFC7677["client_final"]
    c.verify_server_final(RFC7677["server_final"])
    assert c.done


def test_scram_rejects_a_forged_server() -> None:
    c = pg.ScramSha256Client("user", "pencil", nonce="rOprNGfwEbeRWgbNEkqO")
    c.client_first()
    c.client_final(RFC7677["server_first"])
    forged = b"v=" + base64.b64encode(b"\0" * 32)
    with pytest.raises(ProtocolError, match="server signature is wrong") as e:
        c.verify_server_final(forged)
    assert e.value.kind == "auth_failed" and not c.done
    with pytest.raises(ProtocolError, match="failed on the server: invalid-proof"):
        c.verify_server_final(b"e=invalid-proof")


def test_scram_rejects_bad_server_first() -> None:
    def fresh() -> pg.ScramSha256Client:
        c = pg.ScramSha256Client("u", "p", nonce="abc")
        c.client_first()
        return c

    bad = [
        (b"r=xyz123,s=c2FsdA==,i=4096", "does not extend"),
        (b"r=abc,s=c2FsdA==,i=4096", "does not extend"),
        (b"r=abcd,s=!!!,i=4096", "not base64"),
        (b"r=abcd,s=c2FsdA==,i=0", "iteration count"),
        (b"r=abcd,s=c2FsdA==,i=99999999", "iteration count"),
        (b"r=abcd,s=c2FsdA==,i=x", "iteration count"),
        (b"m=ext,r=abcd,s=c2FsdA==,i=1", "unsupported extension"),
        (b"s=c2FsdA==,r=abcd,i=1", "expected r=, s=, i="),
        (b"garbage", "attribute"),
        (b"\xff", "not UTF-8"),
    ]
    for msg, match in bad:
        with pytest.raises(ProtocolError, match=match):
            fresh().client_final(msg)
    with pytest.raises(RuntimeError, match="before client_first"):
        pg.ScramSha256Client("u", "p").client_final(b"r=x,s=c2FsdA==,i=1")
    with pytest.raises(RuntimeError, match="before client_final"):
        pg.ScramSha256Client("u", "p").verify_server_final(b"v=x")
    with pytest.raises(ValueError, match="nonce"):
        pg.ScramSha256Client("u", "p", nonce="a,b")


class ScramServer:
    """The server side of SCRAM-SHA-256, written from RFC 5802 for the test."""

    def __init__(self, password: str, iterations: int = 4096) -> None:
        self.salt = secrets.token_bytes(16)
        self.iterations = iterations
        salted = hashlib.pbkdf2_hmac("sha256", password.encode(), self.salt, iterations)
        self.stored_key = hashlib.sha256(hmac.digest(salted, b"Client Key", "sha256")).digest()
        self.server_key = hmac.digest(salted, b"Server Key", "sha256")

    def first(self, client_first: bytes) -> bytes:
        assert client_first.startswith(b"n,,")
        self.client_first_bare = client_first[3:].decode()
        client_nonce = dict(a.split("=", 1) for a in self.client_first_bare.split(","))["r"]
        self.nonce = client_nonce + base64.b64encode(secrets.token_bytes(18)).decode()
        salt = base64.b64encode(self.salt).decode()
        self.server_first = f"r={self.nonce},s={salt},i={self.iterations}"
        return self.server_first.encode()

    def final(self, client_final: bytes) -> bytes:
        without_proof, proof_attr = client_final.decode().rsplit(",", 1)
        assert without_proof == f"c=biws,r={self.nonce}"
        proof = base64.b64decode(proof_attr.removeprefix("p="))
        auth = f"{self.client_first_bare},{self.server_first},{without_proof}".encode()
        sig = hmac.digest(self.stored_key, auth, "sha256")
        client_key = bytes(a ^ b for a, b in zip(proof, sig, strict=True))
        if hashlib.sha256(client_key).digest() != self.stored_key:
            return b"e=invalid-proof"
        return b"v=" + base64.b64encode(hmac.digest(self.server_key, auth, "sha256"))


@pytest.mark.parametrize(("password", "tried"), [("correct horse", "correct horse"), ("s3cret", "wrong")])
def test_scram_against_a_server_computation(password: str, tried: str) -> None:
    server = ScramServer(password, iterations=1000)
    client = pg.ScramSha256Client("alice", tried)
    final = server.final(client.client_final(server.first(client.client_first())))
    if password == tried:
        client.verify_server_final(final)
        assert client.done
    else:
        with pytest.raises(ProtocolError, match="invalid-proof"):
            client.verify_server_final(final)


def test_scram_user_name_escaping_and_saslprep() -> None:
    c = pg.ScramSha256Client("a=b,c", "x", nonce="n")
    assert c.client_first() == b"n,,n=a=3Db=2Cc,r=n"
    assert pg.saslprep("I\u00adX") == "IX"  # soft hyphen maps to nothing
    assert pg.saslprep("user\u00a0name") == "user name"  # non-ASCII space maps to space
    assert pg.saslprep("\u2168") == "IX"  # NFKC
    assert pg.saslprep("ascii\x07") == "ascii\x07"  # pure ASCII untouched, as PostgreSQL does
    for bad in ("a\u0007é", "\u0627\u0031"):
        with pytest.raises(ValueError, match="SASLprep"):
            pg.saslprep(bad)
    # A password SASLprep refuses is used as is (PostgreSQL's rule), on both sides.
    server = ScramServer("é\u0007")
    client = pg.ScramSha256Client("u", "é\u0007")
    client.verify_server_final(server.final(client.client_final(server.first(client.client_first()))))


# --------------------------------------------------------------------------------------------
# audit helpers


def test_describe_params() -> None:
    params = [b"hello", None, b"\x00\xffab", "é".encode() * 200, b"\x01" * 300]
    out = pg.describe_params(params, [0, 0, 1, 0, 1], max_len=256)
    assert out[:3] == ["hello", None, "\\x00ff6162"]
    assert out[3] == "é" * 128 + "…[truncated 144 bytes]"
    assert out[4] == "\\x" + "01" * 256 + "…[truncated 44 bytes]"
    # A multi-byte character cut by the limit is dropped, not shown as garbage.
    assert pg.describe_params(["aé".encode()], [], max_len=2) == ["a…[truncated 1 bytes]"]
    assert pg.describe_params([b"\xffx", b"ab\xc3"], []) == ["\ufffdx", "ab\ufffd"]
    assert pg.describe_params([b"\x01", b"\x02"], [1]) == ["\\x01", "\\x02"]  # one format for all
    typed = pg.describe_params(
        [be32(-7), struct.pack("!q", 2**40), b"\x01", b"caf\xc3\xa9", b"\x01{}", bytes(range(16)), be32(1)],
        [1],
        types=[23, 20, 16, 25, 3802, 2950, 20],
    )
    assert typed == [
        "-7",
        str(2**40),
        "true",
        "café",
        "{}",
        "00010203-0405-0607-0809-0a0b0c0d0e0f",
        "\\x00000001",  # wrong size for int8: shown raw, not misread
    ]
    with pytest.raises(ProtocolError, match="2 parameter formats for 3 parameters"):
        pg.describe_params([b"", b"", b""], [0, 1])


class Session:
    """Drives a tracker with client messages and scripted server answers."""

    def __init__(self, **kw: int) -> None:
        self.t = pg.ExtendedQueryTracker(**kw)

    def send(self, *wire: bytes) -> list[pg.AuditedQuery]:
        msgs = typed_reader().feed(b"".join(wire))
        return [a for m in msgs if (a := self.t.client(m)) is not None]

    def answer(self, *wire: bytes) -> None:
        for m in server_msgs(*wire):
            self.t.server(m)


PC, BC, CC, ZI, ZT = (
    pg.encode_message(b"1"),
    pg.encode_message(b"2"),
    pg.encode_message(b"3"),
    pg.ready_for_query(b"I"),
    pg.ready_for_query(b"T"),
)
ERR = pg.error_response("syntax error", code="42601", severity="ERROR")


def test_tracker_unnamed_statement_in_one_group() -> None:
    s = Session()
    a = s.send(pg.parse("", "SELECT $1"), pg.bind("", "", [b"7"]), pg.execute(), pg.sync())
    assert [(x.event, x.query, x.params, x.certain) for x in a] == [
        ("bind", "SELECT $1", ("7",), True),
        ("execute", "SELECT $1", ("7",), True),
    ]
    s.answer(PC, BC, pg.encode_message(b"C", b"SELECT 1\0"), ZI)
    assert s.t.statement("") == "SELECT $1" and s.t.pending == 0
    # The portal ended with the implicit transaction; the unnamed statement lives on.
    (e,) = s.send(pg.execute())
    assert e.query is None
    (b,) = s.send(pg.bind("", "", [b"8"]))
    assert (b.query, b.params) == ("SELECT $1", ("8",))
    # A simple query drops the unnamed statement.
    s.send(pg.bind("", "", [b"8"]), pg.sync())
    s.answer(BC, ZI)
    s.send(pg.query("SELECT 2"))
    s.answer(pg.encode_message(b"C", b"SELECT 1\0"), ZI)
    assert s.t.statement("") is None
    (b,) = s.send(pg.bind("", "", []))
    assert b.query is None


def test_tracker_failed_parse_never_stands_in() -> None:
    """A Parse the server refused must not mask the statement that really runs."""
    s = Session()
    s.send(pg.parse("x", "DELETE FROM audit"), pg.sync())
    s.answer(PC, ZI)
    # Same name again: the server refuses ("already exists") and keeps the DELETE.
    (b,) = s.send(pg.parse("x", "SELECT 1"), pg.bind("", "x", []), pg.execute(), pg.sync())[:1]
    assert (b.query, b.certain) == ("SELECT 1", True)  # if the Parse fails, this Bind is skipped
    s.answer(pg.error_response("prepared statement already exists", code="42P05", severity="ERROR"), ZI)
    assert s.t.statement("x") == "DELETE FROM audit"
    (b,) = s.send(pg.bind("", "x", []), pg.sync())
    assert (b.query, b.certain) == ("DELETE FROM audit", True)
    s.answer(BC, ZI)
    # A Parse with a syntax error creates nothing; the next Parse of that name does.
    s.send(pg.parse("y", "SELEC oops"), pg.sync())
    s.answer(ERR, ZI)
    s.send(pg.parse("y", "DROP TABLE t"), pg.sync())
    s.answer(PC, ZI)
    assert s.t.statement("y") == "DROP TABLE t"
    # Close, confirmed.
    s.send(pg.close(b"S", "y"), pg.sync())
    s.answer(CC, ZI)
    assert s.t.statement("y") is None


def test_tracker_pipelined_groups_are_flagged_uncertain() -> None:
    s = Session()
    s.send(pg.parse("x", "SELECT 'old'"), pg.sync())
    s.answer(PC, ZI)
    # Pipelined: Close+Parse in one group, Bind in the next, before any answer.
    s.send(pg.close(b"S", "x"), pg.parse("x", "SELECT 'new'"), pg.sync())
    (b,) = s.send(pg.bind("", "x", []), pg.sync())
    assert (b.query, b.certain) == ("SELECT 'new'", False)
    s.answer(CC, PC, ZI)
    (b,) = s.send(pg.bind("", "x", []))
    assert (b.query, b.certain) == ("SELECT 'new'", True)
    # A pipelined Parse of a brand-new name: if it failed the Bind fails too, so it is certain.
    s2 = Session()
    s2.send(pg.parse("z", "SELECT 3"), pg.sync())
    (b,) = s2.send(pg.bind("p", "z", []))
    assert (b.query, b.certain) == ("SELECT 3", True)


def test_tracker_named_portals_and_describe_types() -> None:
    s = Session()
    s.send(pg.query("BEGIN"))
    s.answer(pg.encode_message(b"C", b"BEGIN\0"), ZT)
    s.send(pg.parse("q", "SELECT * FROM t WHERE id = $1"), pg.describe(b"S", "q"), pg.sync())
    s.answer(PC, pg.encode_message(b"t", be16(1) + be32(20)), pg.encode_message(b"n"), ZT)
    s.send(pg.bind("cur", "q", [struct.pack("!q", 99)], [1]), pg.sync())
    s.answer(BC, ZT)
    (e,) = s.send(pg.execute("cur", 10))
    assert (e.portal, e.statement, e.params, e.max_rows, e.certain) == ("cur", "q", ("99",), 10, True)
    s.send(pg.sync())
    s.answer(pg.encode_message(b"s"), ZT)
    s.send(pg.close(b"P", "cur"), pg.sync())
    s.answer(CC, ZT)
    (e,) = s.send(pg.execute("cur"))
    assert e.query is None


def test_tracker_memory_is_bounded() -> None:
    s = Session(max_statements=3)
    for i in range(5):
        s.send(pg.parse(f"s{i}", f"SELECT {i}"), pg.sync())
        s.answer(PC, ZI)
    assert [s.t.statement(f"s{i}") for i in range(5)] == [None, None, "SELECT 2", "SELECT 3", "SELECT 4"]
    (b,) = s.send(pg.bind("", "s0", []))
    assert b.query is None  # forgotten: unknown, never a guess
    s = Session(max_bytes=100)
    s.send(pg.parse("a", "x" * 60), pg.parse("b", "y" * 60), pg.sync())
    s.answer(PC, PC, ZI)
    assert (s.t.statement("a"), s.t.statement("b")) == (None, "y" * 60)


def test_tracker_goes_blind_rather_than_guess() -> None:
    s = Session(max_pending=4)
    s.send(pg.parse("a", "SELECT 1"), pg.sync())
    s.answer(PC, ZI)
    s.send(*[pg.parse(f"n{i}", "SELECT 2") for i in range(5)])
    assert s.t.blind and s.t.statement("a") is None
    (b,) = s.send(pg.parse("", "SELECT 3"), pg.bind("", "", []))
    assert b.query == "SELECT 3"  # same group: still exact
    s.send(pg.sync())
    (b,) = s.send(pg.bind("", "a", []))
    assert b.query is None
    # Answers that do not fit the model (a ParseComplete nobody asked for).
    s = Session()
    s.answer(PC)
    assert s.t.blind


# --------------------------------------------------------------------------------------------
# a real PostgreSQL server


PG_BINS = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), reverse=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _self_signed(root: Path) -> None:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .sign(key, hashes.SHA256())
    )
    (root / "server.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (root / "server.key").write_bytes(pem)
    os.chmod(root / "server.key", 0o600)


@pytest.fixture(scope="module")
def postgres_port() -> Iterator[int]:
    if not PG_BINS:
        pytest.skip("PostgreSQL is not installed")
    bindir = PG_BINS[0].parent
    as_root = os.geteuid() == 0
    if as_root and shutil.which("runuser") is None:
        pytest.skip("running as root without runuser")
    root = Path(tempfile.mkdtemp(prefix="wardgate-pgcodec-"))
    os.chmod(root, 0o755)  # noqa: S103 - the postgres user must reach its files
    _self_signed(root)

    def run(*argv: str) -> None:
        cmd = ["runuser", "-u", "postgres", "--", *argv] if as_root else list(argv)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"{argv[0]} failed: {proc.stdout}\n{proc.stderr}"

    if as_root:
        for p in (root, root / "server.crt", root / "server.key"):
            shutil.chown(p, "postgres", "postgres")
    data, log = root / "data", root / "log"
    port = _free_port()
    try:
        run(str(bindir / "initdb"), "-D", str(data), "-U", "admin", "-A", "trust", "-E", "UTF8", "--no-sync")
        with open(data / "postgresql.conf", "a") as f:
            f.write(
                f"listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = ''\n"
                f"ssl = on\nssl_cert_file = '{root}/server.crt'\nssl_key_file = '{root}/server.key'\n"
                "fsync = off\n"
            )
        (data / "pg_hba.conf").write_text(
            "host all admin 127.0.0.1/32 trust\n"
            "host all scram_user 127.0.0.1/32 scram-sha-256\n"
            "host all md5_user 127.0.0.1/32 md5\n"
            "host all clear_user 127.0.0.1/32 password\n"
        )
        run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "start")
        try:
            yield port
        finally:
            run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop")
    finally:
        shutil.rmtree(root, ignore_errors=True)


SCRAM_PASSWORD = "\uff50äss\u00a0wörd"  # fullwidth and NBSP: only right if SASLprep matches the server's


class Client:
    """A minimal blocking client built from the codec: what the proxy does upstream."""

    def __init__(self, port: int, *, tls: bool = False) -> None:
        self.sock: socket.socket | ssl.SSLSocket = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.reader = pg.BackendReader()
        self.queue: list = []
        if tls:
            self.sock.sendall(pg.ssl_request())
            assert pg.read_ssl_answer(self.sock.recv(1)) is True
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            self.sock = ctx.wrap_socket(self.sock)

    def next(self) -> object:
        while not self.queue:
            data = self.sock.recv(65536)
            assert data, "server closed the connection"
            self.queue += self.reader.feed(data)
        return self.queue.pop(0)

    def until_ready(self) -> list:
        out = []
        while not isinstance(m := self.next(), pg.ReadyForQuery):
            out.append(m)
        return [*out, m]

    def login(self, user: str, password: str = "") -> list:
        self.sock.sendall(pg.startup_message({"user": user, "database": "postgres", "application_name": "t"}))
        scram = None
        while True:
            m = self.next()
            if isinstance(m, pg.ErrorResponse):
                return [m]
            assert isinstance(m, pg.Authentication), m
            if m.code == pg.AUTH_OK:
                return self.until_ready()
            if m.code == pg.AUTH_CLEARTEXT:
                self.sock.sendall(pg.password_message(password.encode()))
            elif m.code == pg.AUTH_MD5:
                self.sock.sendall(pg.password_message(pg.md5_password(user, password, m.salt)))
            elif m.code == pg.AUTH_SASL:
                assert pg.SCRAM_SHA_256 in m.mechanisms
                scram = pg.ScramSha256Client(user, password)
                self.sock.sendall(pg.sasl_initial_response(pg.SCRAM_SHA_256, scram.client_first()))
            elif m.code == pg.AUTH_SASL_CONTINUE:
                assert scram is not None
                self.sock.sendall(pg.sasl_response(scram.client_final(m.data)))
            elif m.code == pg.AUTH_SASL_FINAL:
                assert scram is not None
                scram.verify_server_final(m.data)
            else:
                raise AssertionError(f"unexpected authentication code {m.code}")

    def simple(self, sql: str) -> list[list[str | None]]:
        self.sock.sendall(pg.query(sql))
        msgs = self.until_ready()
        errors = [m for m in msgs if isinstance(m, pg.ErrorResponse)]
        assert not errors, errors[0].message
        return [data_row(m.body) for m in msgs if isinstance(m, pg.BackendMessage) and m.type == b"D"]


def data_row(body: bytes) -> list[str | None]:
    n = struct.unpack_from("!h", body)[0]
    pos, out = 2, []
    for _ in range(n):
        size = struct.unpack_from("!i", body, pos)[0]
        pos += 4
        if size < 0:
            out.append(None)
        else:
            out.append(body[pos : pos + size].decode())
            pos += size
    return out


@pytest.mark.slow
def test_real_postgres_auth_queries_and_tracker(postgres_port: int) -> None:
    admin = Client(postgres_port)
    first = admin.login("admin")
    assert any(isinstance(m, pg.BackendKeyData) for m in first)
    params = {m.name: m.value for m in first if isinstance(m, pg.ParameterStatus)}
    assert params["server_encoding"] == "UTF8"
    admin.simple(
        "SET password_encryption = 'scram-sha-256';"
        f"CREATE ROLE scram_user LOGIN PASSWORD '{SCRAM_PASSWORD}';"
        "CREATE ROLE clear_user LOGIN PASSWORD 'plain-pw';"
        "SET password_encryption = 'md5';"
        "CREATE ROLE md5_user LOGIN PASSWORD 'md5-pw';"
        "CREATE TABLE items (id int primary key, name text);"
        "INSERT INTO items VALUES (1, 'apple'), (2, 'pear');"
        "GRANT SELECT ON items TO scram_user, md5_user, clear_user"
    )
    admin.sock.sendall(pg.terminate())
    admin.sock.close()

    for user, password, tls in (
        ("scram_user", SCRAM_PASSWORD, True),
        ("md5_user", "md5-pw", False),
        ("clear_user", "plain-pw", False),
    ):
        c = Client(postgres_port, tls=tls)
        assert isinstance(c.login(user, password)[-1], pg.ReadyForQuery), user
        assert c.simple("SELECT current_user, 41 + 1") == [[user, "42"]]

        # Extended protocol, audited by the tracker on both directions of the stream.
        tracker = pg.ExtendedQueryTracker()
        wire = (
            pg.parse("by_id", "SELECT name FROM items WHERE id = $1", [23])
            + pg.bind("", "by_id", [struct.pack("!i", 2)], [1])
            + pg.execute()
            + pg.sync()
        )
        audited = [a for m in typed_reader().feed(wire) if (a := tracker.client(m)) is not None]
        c.sock.sendall(wire)
        answers = c.until_ready()
        for m in answers:
            tracker.server(m)
        assert [data_row(m.body) for m in answers if getattr(m, "type", None) == b"D"] == [["pear"]]
        assert [(a.event, a.query, a.params) for a in audited] == [
            ("bind", "SELECT name FROM items WHERE id = $1", ("2",)),
            ("execute", "SELECT name FROM items WHERE id = $1", ("2",)),
        ]
        assert tracker.statement("by_id") == "SELECT name FROM items WHERE id = $1" and tracker.pending == 0

        # Parse of a taken name fails on the server; the tracker keeps what the server keeps.
        c.sock.sendall(pg.parse("by_id", "SELECT 'other'") + pg.sync())
        for m in typed_reader().feed(pg.parse("by_id", "SELECT 'other'") + pg.sync()):
            tracker.client(m)
        answers = c.until_ready()
        assert [m.code for m in answers if isinstance(m, pg.ErrorResponse)] == ["42P05"]
        for m in answers:
            tracker.server(m)
        assert tracker.statement("by_id") == "SELECT name FROM items WHERE id = $1"
        c.sock.sendall(pg.terminate())
        c.sock.close()

    bad = Client(postgres_port)
    (err,) = bad.login("scram_user", "wrong")
    assert (err.code, err.severity) == ("28P01", "FATAL")
    assert 'password authentication failed for user "scram_user"' in err.message
