"""Framing for the `-ping` ALPN variants: length-prefixed frames with empty keep-alives.

Some load balancers kill a TCP stream that carries no bytes for a minute. A client that knows
it sits behind one asks for `ward-ssh-ping` (or any `X-ping`) instead of `ward-ssh`; both ends
then wrap every write in a frame (4-byte big-endian length, then the payload) and the proxy sends
an empty frame now and then, which the reader drops. The payload bytes form one stream: frame
boundaries carry no meaning, so the decoder hands payload out as it arrives instead of buffering
whole frames.
"""

from __future__ import annotations

from wardgate.protocols.errors import ProtocolError

MAX_FRAME = 1 << 20
"""Largest payload one frame may carry (1 MiB); a bigger length is garbage or an attack."""

HEADER_SIZE = 4
KEEPALIVE = b"\x00\x00\x00\x00"
"""An empty frame: the keep-alive both ends ignore."""


def encode(data: bytes | bytearray | memoryview, *, max_frame: int = MAX_FRAME) -> list[bytes | memoryview]:
    """Frame `data` as header/payload pieces, ready for `transport.writelines`.

    Empty input gives no frames (an empty frame would read as a keep-alive); input longer than
    `max_frame` is split. The payload pieces are views of `data`, not copies.
    """
    mv = memoryview(data).cast("B")
    out: list[bytes | memoryview] = []
    for start in range(0, len(mv), max_frame):
        piece = mv[start : start + max_frame]
        out.append(len(piece).to_bytes(HEADER_SIZE, "big"))
        out.append(piece)
    return out


def frame(data: bytes | bytearray | memoryview, *, max_frame: int = MAX_FRAME) -> bytes:
    """`encode` joined into one bytes object; convenient for small writes and tests."""
    return b"".join(encode(data, max_frame=max_frame))


class PingDecoder:
    """Feed framed bytes, get payload pieces back; keep-alives are counted and dropped."""

    __slots__ = ("_header", "_left", "keepalives", "max_frame")

    def __init__(self, *, max_frame: int = MAX_FRAME) -> None:
        self.max_frame = max_frame
        self.keepalives = 0
        self._header = bytearray()
        self._left = 0

    @property
    def in_frame(self) -> bool:
        """True partway through a frame: an EOF now means the peer cut a frame short."""
        return bool(self._left or self._header)

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Return the payload bytes contained in `data` (copies: callers may reuse `data`)."""
        mv = memoryview(data).cast("B")
        n = len(mv)
        out: list[bytes] = []
        i = 0
        while i < n:
            if self._left:
                take = min(self._left, n - i)
                out.append(bytes(mv[i : i + take]))
                i += take
                self._left -= take
                continue
            need = HEADER_SIZE - len(self._header)
            self._header += mv[i : i + need]
            i += min(need, n - i)
            if len(self._header) < HEADER_SIZE:
                break
            length = int.from_bytes(self._header, "big")
            self._header.clear()
            if length == 0:
                self.keepalives += 1
            elif length > self.max_frame:
                raise ProtocolError(
                    f"ping frame of {length} bytes exceeds the {self.max_frame}-byte limit", kind="oversized"
                )
            else:
                self._left = length
        return out
