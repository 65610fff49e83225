"""Streams between owners: hold a fresh connection paused (keeping early bytes) and hand it to
the protocol that will own it, replaying what was held. Shared by the proxy's router and agents'
tunnel dialers, which both accept or dial a TLS stream before they know who will consume it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any


class HeldStream(asyncio.Protocol):
    """Owns a stream between the handshake and the handler: paused, early bytes kept."""

    def __init__(self) -> None:
        self.transport: Any = None
        self.data: list[bytes] = []
        self.eof = False
        self.lost = False
        self.exc: Exception | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        transport.pause_reading()  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.data.append(bytes(data))

    def eof_received(self) -> bool:
        self.eof = True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.exc = exc

    def take_data(self) -> bytes:
        data = b"".join(self.data)
        self.data.clear()
        return data


def deliver(protocol: asyncio.BaseProtocol, data: bytes, paused: Callable[[], bool] = lambda: False) -> bytes:
    """Give bytes to a protocol of either kind, as a transport would; returns what is left
    undelivered because the protocol paused reading part way (buffered protocols only)."""
    if not isinstance(protocol, asyncio.BufferedProtocol):
        protocol.data_received(data)  # type: ignore[attr-defined]
        return b""
    mv = memoryview(data)
    while mv:
        buf = memoryview(protocol.get_buffer(len(mv))).cast("B")
        n = min(len(buf), len(mv))
        if n == 0:
            raise RuntimeError("protocol.get_buffer() returned an empty buffer")
        buf[:n] = mv[:n]
        protocol.buffer_updated(n)
        mv = mv[n:]
        if mv and paused():
            return bytes(mv)
    return b""


def hand_over(hold: HeldStream, protocol: asyncio.BaseProtocol) -> None:
    """Move a held stream to `protocol`, replaying what the hold saw, then let it read.

    The early bytes are at most one TLS read (the hold paused at once), and are given in full:
    a buffered protocol may see them even if it pauses part way.
    """
    transport = hold.transport
    transport.set_protocol(protocol)
    protocol.connection_made(transport)
    data = hold.take_data()
    if data:
        deliver(protocol, data)
    if hold.eof:
        protocol.eof_received()  # type: ignore[attr-defined]
    if hold.lost:
        protocol.connection_lost(hold.exc)
    elif not hold.eof:
        transport.resume_reading()
