"""An `asyncio.Transport` over a stream pair, so a protocol (aiohttp's HTTP server) can run on a
connection the app service only gets as streams: asyncio streams from the proxy in this process,
or asyncssh's `SSHReader`/`SSHWriter` for a reverse-tunnel channel.

Reading: a pump task reads the stream and calls `data_received`, and stops reading while the
protocol has paused it (so aiohttp's request-body back-pressure reaches the client). Writing:
bytes go straight to the writer; once more than `high_water` bytes were written since the last
`drain()`, the protocol is told `pause_writing` and a drain runs, then `resume_writing` (so a
slow client stops aiohttp from buffering a whole upstream response).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

READ_SIZE = 64 * 1024
HIGH_WATER = 256 * 1024


def abort_writer(writer: Any) -> None:
    """Drop a stream now: asyncssh writers through their channel, asyncio ones their transport."""
    with contextlib.suppress(Exception):
        chan = getattr(writer, "channel", None)
        if chan is not None:
            chan.abort()
        else:
            writer.transport.abort()
    with contextlib.suppress(Exception):
        writer.close()  # a no-op on the dropped stream, but marks the writer closed


class StreamTransport(asyncio.Transport):
    """One connection's transport for one protocol; `start(protocol)` begins the pump.

    `on_data(data)`, when given, sees every chunk just before the protocol does (the app service
    times request heads with it). `connection_lost` is called exactly once, after `close()`,
    `abort()`, the stream's end (unless `eof_received` asks to keep the connection open) or a
    stream error.
    """

    def __init__(
        self,
        reader: Any,
        writer: Any,
        *,
        peername: tuple[str, int] | None = None,
        sockname: tuple[str, int] | None = None,
        on_data: Callable[[bytes], None] | None = None,
        read_size: int = READ_SIZE,
        high_water: int = HIGH_WATER,
    ) -> None:
        super().__init__({"peername": peername, "sockname": sockname})
        self._reader = reader
        self._writer = writer
        self._on_data = on_data
        self._read_size = read_size
        self._high = high_water
        self._low = 0
        self._protocol: Any = None
        self._loop = asyncio.get_running_loop()
        self._reading = asyncio.Event()
        self._reading.set()
        self._closing = False
        self._lost = False
        self._eof_written = False
        self._unflushed = 0
        self._writing_paused = False
        self._pump_task: asyncio.Task[None] | None = None
        self._drain_task: asyncio.Task[None] | None = None
        self._closed: asyncio.Future[None] = self._loop.create_future()

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol
        protocol.connection_made(self)
        if not self._closing:
            self._pump_task = self._loop.create_task(self._pump())

    async def wait_closed(self) -> None:
        """Return once `connection_lost` has been delivered."""
        await asyncio.shield(self._closed)

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        """Stop reading, flush what was written (the writer does), then close."""
        if self._closing:
            return
        self._closing = True
        self._stop_tasks()
        with contextlib.suppress(Exception):
            self._writer.close()
        self._loop.call_soon(self._connection_lost, None)

    def abort(self) -> None:
        """Drop the connection now, discarding unsent bytes."""
        if self._lost:
            return
        self._closing = True
        self._stop_tasks()
        abort_writer(self._writer)
        self._loop.call_soon(self._connection_lost, None)

    def _stop_tasks(self) -> None:
        current = asyncio.current_task()
        for t in (self._pump_task, self._drain_task):
            if t is not None and t is not current and not t.done():
                t.cancel()

    def _connection_lost(self, exc: BaseException | None) -> None:
        if self._lost:
            return
        self._lost = True
        self._closing = True
        self._stop_tasks()
        try:
            if self._protocol is not None:
                self._protocol.connection_lost(exc)
        finally:
            if not self._closed.done():
                self._closed.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        """The stream broke: drop it and tell the protocol why."""
        if self._lost:
            return
        self._closing = True
        abort_writer(self._writer)
        self._loop.call_soon(self._connection_lost, exc)

    # -- extra info, protocol ----------------------------------------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        value = self._extra.get(name)
        return default if value is None else value

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol  # type: ignore[no-any-return]

    # -- reading -----------------------------------------------------------------------------

    def is_reading(self) -> bool:
        return self._reading.is_set() and not self._closing

    def pause_reading(self) -> None:
        self._reading.clear()

    def resume_reading(self) -> None:
        self._reading.set()

    async def _pump(self) -> None:
        try:
            while True:
                data = await self._reader.read(self._read_size)
                if not data:
                    break
                if not self._reading.is_set():
                    await self._reading.wait()  # honour a pause that came while we were reading
                if self._closing:
                    return
                if self._on_data is not None:
                    self._on_data(data)
                self._protocol.data_received(data)
                if not self._reading.is_set():
                    await self._reading.wait()
                if self._closing:
                    return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.debug("stream read failed: %r", exc)
            self._fail(exc)
            return
        if self._closing:
            return
        keep_open = self._protocol.eof_received()
        if not keep_open:
            self.close()

    # -- writing -----------------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data or self._closing or self._eof_written:
            return
        try:
            self._writer.write(bytes(data))
        except Exception as exc:
            self._fail(exc)
            return
        self._unflushed += len(data)
        if self._unflushed > self._high and self._drain_task is None:
            if not self._writing_paused:
                self._writing_paused = True
                self._protocol.pause_writing()
            self._drain_task = self._loop.create_task(self._drain())

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    async def _drain(self) -> None:
        try:
            await self._writer.drain()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._drain_task = None
            self._fail(exc)
            return
        self._drain_task = None
        self._unflushed = 0
        if self._writing_paused and not self._closing:
            self._writing_paused = False
            self._protocol.resume_writing()

    def can_write_eof(self) -> bool:
        try:
            return bool(self._writer.can_write_eof())
        except Exception:
            return False

    def write_eof(self) -> None:
        if self._closing or self._eof_written:
            return
        self._eof_written = True
        with contextlib.suppress(Exception):
            self._writer.write_eof()

    def get_write_buffer_size(self) -> int:
        return self._unflushed

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low, self._high

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if high is None:
            high = HIGH_WATER if low is None else 4 * low
        self._high, self._low = high, low if low is not None else high // 4
