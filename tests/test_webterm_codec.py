"""The terminal WebSocket envelope: what each side may send, how payloads parse, what is refused."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wardgate.protocols import webterm as wt
from wardgate.protocols.errors import ProtocolError


def test_data_round_trip_both_ways() -> None:
    msg = wt.encode_data(b"ls -l\r")
    assert msg == b"dls -l\r"
    for from_browser in (True, False):
        f = wt.decode(msg, from_browser=from_browser)
        assert (f.kind, f.value, f.payload) == ("d", b"ls -l\r", b"ls -l\r")
    assert wt.decode(b"d", from_browser=True).value == b""  # an empty write is still a write


def test_token_and_error_are_text() -> None:
    assert wt.decode(wt.encode_text("a", "tok-é"), from_browser=True).value == "tok-é"
    f = wt.decode(wt.encode_text("e", 'node "x" is unreachable'), from_browser=False)
    assert (f.kind, f.value) == ("e", 'node "x" is unreachable')


def test_resize_parses_into_a_validated_value() -> None:
    f = wt.decode(wt.encode_resize(132, 43), from_browser=True)
    assert f.value == wt.Resize(132, 43)
    extra = wt.decode(b'r{"cols": 1, "rows": 1000, "extra": true}', from_browser=True)
    assert extra.value == wt.Resize(1, 1000)


@pytest.mark.parametrize(
    ("payload", "words"),
    [
        (b'{"cols": 0, "rows": 24}', "between 1 and 1000"),
        (b'{"cols": 80, "rows": 1001}', "between 1 and 1000"),
        (b'{"cols": -5, "rows": 24}', "between 1 and 1000"),
        (b'{"cols": 80.0, "rows": 24}', "integer"),
        (b'{"cols": "80", "rows": 24}', "integer"),
        (b'{"cols": true, "rows": 24}', "integer"),
        (b'{"cols": 80}', "missing rows"),
        (b"{}", "missing cols and rows"),
        (b"[80, 24]", "JSON object"),
        (b'{"cols": NaN, "rows": 24}', "not valid JSON"),
        (b'{"cols": 80, "rows": 24', "not valid JSON"),
        (b"", "not valid JSON"),
    ],
)
def test_bad_resizes_are_refused_with_a_reason(payload: bytes, words: str) -> None:
    with pytest.raises(ProtocolError, match=words):
        wt.decode(b"r" + payload, from_browser=True)


def test_server_json_kinds() -> None:
    s = {"sid": "9d1f", "node": "web1", "login": "root", "mode": "shell", "cluster": "c"}
    assert wt.decode(wt.encode_json("s", s), from_browser=False).value == s
    ch = {"otp": True, "webauthn": None}
    assert wt.decode(wt.encode_json("m", ch), from_browser=False).value == ch
    for x in ({"code": 3, "signal": None}, {"code": None, "signal": "KILL"}):
        assert wt.decode(wt.encode_json("x", x), from_browser=False).value == x
    with pytest.raises(ProtocolError, match="code must be an integer"):
        wt.decode(b'x{"code": "3"}', from_browser=False)
    with pytest.raises(ProtocolError, match="signal must be a string"):
        wt.decode(b'x{"code": null, "signal": 9}', from_browser=False)


def test_mfa_answers() -> None:
    assert wt.decode(wt.encode_json("m", {"otp": "123456"}), from_browser=True).value == {"otp": "123456"}
    assertion = {"id": "abc", "response": {"clientDataJSON": "x"}}
    answer = wt.decode(wt.encode_json("m", {"webauthn": assertion}), from_browser=True)
    assert answer.value == {"webauthn": assertion}
    for bad, words in (
        ({}, "exactly one"),
        ({"otp": "1", "webauthn": {}}, "exactly one"),
        ({"otp": 123456}, "otp must be a string"),
        ({"webauthn": "x"}, "webauthn must be an object"),
    ):
        with pytest.raises(ProtocolError, match=words):
            wt.decode(b"m" + json.dumps(bad).encode(), from_browser=True)


def test_keepalive_is_empty() -> None:
    assert wt.decode(wt.encode_ping(), from_browser=True).kind == "p"
    assert wt.decode(b"p", from_browser=False).value is None
    with pytest.raises(ProtocolError, match="empty"):
        wt.decode(b"px", from_browser=True)


@pytest.mark.parametrize(
    ("msg", "from_browser", "words", "kind"),
    [
        (b"", True, "empty message from the browser", "malformed"),
        (b"", False, "empty message from the proxy", "malformed"),
        (b"z", True, "unknown message type", "unknown_type"),
        (b"\x00hello", False, "unknown message type", "unknown_type"),
        (b"s{}", True, "browser may not send 's'", "wrong_direction"),
        (b"x{}", True, "browser may not send 'x'", "wrong_direction"),
        (b"eoops", True, "browser may not send 'e'", "wrong_direction"),
        (b"atoken", False, "proxy may not send 'a'", "wrong_direction"),
        (b'r{"cols":1,"rows":1}', False, "proxy may not send 'r'", "wrong_direction"),
        (b"a\xff\xfe", True, "not UTF-8", "malformed"),
        (b"e\xc3", False, "not UTF-8", "malformed"),
        (b"m\xff", False, "not UTF-8", "malformed"),
        (b"s" + b"[" * 50_000, False, "nested too deeply", "malformed"),
        (b's"just a string"', False, "JSON object", "malformed"),
    ],
)
def test_refusals(msg: bytes, from_browser: bool, words: str, kind: str) -> None:
    with pytest.raises(ProtocolError, match=words) as info:
        wt.decode(msg, from_browser=from_browser)
    assert info.value.kind == kind


def test_size_limits_depend_on_direction() -> None:
    at_limit = b"d" + b"x" * (wt.MAX_BROWSER_MESSAGE - 1)
    assert len(wt.decode(at_limit, from_browser=True).value) == wt.MAX_BROWSER_MESSAGE - 1
    with pytest.raises(ProtocolError, match="over the limit of 65536") as info:
        wt.decode(at_limit + b"x", from_browser=True)
    assert info.value.kind == "oversized"
    # The proxy's messages may be larger, up to 1 MiB.
    assert wt.decode(at_limit + b"x", from_browser=False).kind == "d"
    with pytest.raises(ProtocolError, match="over the limit"):
        wt.decode(b"d" + bytes(wt.MAX_SERVER_MESSAGE), from_browser=False)


def test_encoders_refuse_the_wrong_kind() -> None:
    with pytest.raises(ValueError, match="does not carry JSON"):
        wt.encode_json("d", {})
    with pytest.raises(ValueError, match="does not carry text"):
        wt.encode_text("s", "x")
    with pytest.raises(ValueError, match="unknown"):
        wt.encode_json("q", {})  # type: ignore[arg-type]
    with pytest.raises(ProtocolError, match="between 1 and 1000"):
        wt.encode_resize(0, 10)


# ---------------------------------------------------------------- properties

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=wt.MAX_BROWSER_MESSAGE - 1))
def test_data_round_trips(data: bytes) -> None:
    for from_browser in (True, False):
        assert wt.decode(wt.encode_data(data), from_browser=from_browser).value == data


@settings(max_examples=300, deadline=None)
@given(kind=st.sampled_from(["a", "e"]), text=st.text(max_size=500))
def test_text_round_trips(kind: str, text: str) -> None:
    assert wt.decode(wt.encode_text(kind, text), from_browser=kind == "a").value == text


@settings(max_examples=300, deadline=None)
@given(cols=st.integers(1, 1000), rows=st.integers(1, 1000))
def test_resize_round_trips(cols: int, rows: int) -> None:
    assert wt.decode(wt.encode_resize(cols, rows), from_browser=True).value == wt.Resize(cols, rows)


@settings(max_examples=300, deadline=None)
@given(obj=st.dictionaries(st.text(max_size=10), json_values, max_size=6))
def test_session_objects_round_trip(obj: dict) -> None:
    assert wt.decode(wt.encode_json("s", obj), from_browser=False).value == obj


@settings(max_examples=1000, deadline=None)
@given(msg=st.binary(max_size=300), from_browser=st.booleans())
def test_arbitrary_bytes_only_ever_raise_protocol_error(msg: bytes, from_browser: bool) -> None:
    try:
        f = wt.decode(msg, from_browser=from_browser)
    except ProtocolError as exc:
        message = str(exc)
        assert message  # always says what was wrong
        return
    assert f.kind in (wt.BROWSER_KINDS if from_browser else wt.SERVER_KINDS)
    assert f.payload == msg[1:]


@settings(max_examples=500, deadline=None)
@given(
    kind=st.sampled_from(sorted(wt.KINDS)),
    body=st.one_of(
        st.binary(max_size=200),
        json_values.map(lambda v: json.dumps(v).encode()),
        st.builds(lambda c, r: json.dumps({"cols": c, "rows": r}).encode(), json_values, json_values),
    ),
    from_browser=st.booleans(),
)
def test_plausible_messages_only_ever_raise_protocol_error(
    kind: str, body: bytes, from_browser: bool
) -> None:
    """Right type byte, payload anything JSON-ish: parsed or refused, never another exception."""
    with contextlib.suppress(ProtocolError):
        wt.decode(kind.encode() + body, from_browser=from_browser)
