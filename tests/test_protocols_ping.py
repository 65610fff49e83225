"""The -ping framing: what goes in comes out, however the bytes are chunked, keep-alives dropped."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wardgate.protocols.errors import ProtocolError
from wardgate.protocols.ping import KEEPALIVE, MAX_FRAME, PingDecoder, encode, frame


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


@settings(max_examples=200, deadline=None)
@given(
    writes=st.lists(st.binary(max_size=2000), max_size=20),
    keepalive_after=st.sets(st.integers(0, 20)),
    cuts=st.lists(st.integers(0, 1 << 16), max_size=30),
    max_frame=st.integers(1, 3000),
)
def test_round_trip_any_chunking(
    writes: list[bytes], keepalive_after: set[int], cuts: list[int], max_frame: int
) -> None:
    wire = bytearray()
    expected_keepalives = 0
    for i, w in enumerate(writes):
        wire += frame(w, max_frame=max_frame)
        if i in keepalive_after:
            wire += KEEPALIVE
            expected_keepalives += 1
    dec = PingDecoder(max_frame=max_frame)
    out = b"".join(b"".join(dec.feed(piece)) for piece in chunked(bytes(wire), cuts))
    assert out == b"".join(writes)
    assert dec.keepalives == expected_keepalives
    assert not dec.in_frame


def test_frame_layout_and_split() -> None:
    assert frame(b"abc") == b"\x00\x00\x00\x03abc"
    assert frame(b"") == b""
    assert [bytes(p) for p in encode(b"abcde", max_frame=2)] == [
        b"\x00\x00\x00\x02",
        b"ab",
        b"\x00\x00\x00\x02",
        b"cd",
        b"\x00\x00\x00\x01",
        b"e",
    ]


def test_frame_limit() -> None:
    dec = PingDecoder()
    assert b"".join(dec.feed(frame(b"x" * MAX_FRAME))) == b"x" * MAX_FRAME
    with pytest.raises(ProtocolError, match="exceeds the 1048576-byte limit") as info:
        dec.feed((MAX_FRAME + 1).to_bytes(4, "big"))
    assert info.value.kind == "oversized"


def test_cut_frame_is_visible() -> None:
    dec = PingDecoder()
    assert dec.feed(b"\x00\x00\x00\x05ab") == [b"ab"]
    assert dec.in_frame
    assert dec.feed(b"cde\x00\x00") == [b"cde"]
    assert dec.in_frame
    assert dec.feed(b"\x00\x00") == []
    assert dec.keepalives == 1
    assert not dec.in_frame
