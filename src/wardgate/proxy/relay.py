"""The one relay: moves bytes between two connections for every protocol Wardgate proxies.

Built for the data plane measured in DESIGN.md: asyncio `BufferedProtocol` endpoints on uvloop,
one 256 KiB buffer per direction that the loop reads straight into and the other transport
writes straight out of (no copies, no per-chunk allocation, no Python work per chunk beyond a
counter and an optional audit tap).

Back-pressure: a transport is asked to call `pause_writing` as soon as it holds *any* unsent
byte (write limits high≈0, low=0), and the relay then stops reading the other side until that
transport has drained. That keeps at most one buffer in user space per direction, makes reuse of
the read buffer safe (uvloop keeps a view of unsent data rather than a copy), and leaves the
queueing to the kernel's socket buffers, which is where it is cheapest.

Half-close: an EOF from one side becomes `write_eof()` on the other where the transport
supports it (TCP); where it does not (TLS: uvloop closes a TLS stream on close_notify) the other
side is closed after its buffer is flushed. The relay ends when both sides are gone.

A plain-socket pair can use `splice_relay` instead (Linux `os.splice` through a pipe: the bytes
never enter Python), at the cost of having no tap.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_BUFFER_SIZE = 256 * 1024
A_TO_B = "a->b"
B_TO_A = "b->a"

Tap = Callable[[str, memoryview], None]
"""Called with the direction (`A_TO_B`/`B_TO_A`) and each chunk; the view is only valid during
the call. Exceptions from a tap end the relay (an audit that cannot record stops the session)."""


@dataclass(slots=True)
class RelayStats:
    """Bytes moved each way and why the relay ended (`done`, `idle`, `closed`, `error`,
    `dial_failed`); `error` holds the first exception seen, if any."""

    a_to_b: int = 0
    b_to_a: int = 0
    reason: str = ""
    error: BaseException | None = None


def _set_write_limits(transport: asyncio.BaseTransport) -> None:
    """Ask for `pause_writing` as soon as the transport holds an unsent byte.

    Plain transports pause when size > high, TLS ones when size >= high; high=1 for TLS avoids
    a pause/resume flap on every write with an empty buffer.
    """
    high = 1 if transport.get_extra_info("ssl_object") is not None else 0
    with contextlib.suppress(AttributeError, NotImplementedError):
        transport.set_write_buffer_limits(high=high, low=0)  # type: ignore[attr-defined]


class _Endpoint(asyncio.BufferedProtocol):
    """One side of a relay: reads its transport into its own buffer, writes into the peer's."""

    def __init__(self, relay: Relay, direction: str, buffer_size: int) -> None:
        self.relay = relay
        self.direction = direction
        self.transport: Any = None
        self.peer: _Endpoint = self
        self.view = memoryview(bytearray(buffer_size))
        self.count = 0
        self.eof = False
        self.lost = False
        self.sink_paused = False
        self.keep_open = True
        self.stash: list[bytes] = []

    # -- asyncio callbacks -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.relay._attached(self, transport)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.peer.sink_paused:
            # Fed although we paused reading (a transport that does not stop at once): the sink
            # may still hold a view of our buffer, so read into a fresh one instead.
            self.view = memoryview(bytearray(len(self.view)))
        return self.view

    def buffer_updated(self, nbytes: int) -> None:
        relay = self.relay
        if not relay.started:
            # The other side is not connected yet: keep the bytes and stop reading meanwhile.
            self.stash.append(bytes(self.view[:nbytes]))
            self.transport.pause_reading()
            return
        chunk = self.view[:nbytes]
        self.count += nbytes
        if relay.tap is not None:
            try:
                relay.tap(self.direction, chunk)
            except Exception as exc:
                relay._fail(exc)
                return
        sink = self.peer.transport
        if not sink.is_closing():
            sink.write(chunk)

    def eof_received(self) -> bool:
        self.eof = True
        if self.relay.started:
            self.relay._forward_eof(self)
        # TCP keeps its write half for the other direction; returning True for TLS only earns a
        # warning from uvloop, which closes the stream on close_notify regardless.
        return self.keep_open

    def connection_lost(self, exc: Exception | None) -> None:
        self.relay._lost(self, exc)

    def pause_writing(self) -> None:
        self.sink_paused = True
        source = self.peer
        if self.relay.started and not source.eof and not source.lost:
            source.transport.pause_reading()

    def resume_writing(self) -> None:
        self.sink_paused = False
        source = self.peer
        if self.relay.started and not source.eof and not source.lost:
            source.transport.resume_reading()


class Relay:
    """A relay between side `a` and side `b`, each either an existing transport or one the
    relay is the protocol for (from `protocol_a()`/`protocol_b()` or `dial_b()`).

    Bytes start moving once both sides are attached; bytes read earlier (and bytes a caller
    already read, passed as `pending`) are forwarded first. `wait()`/`run()` return the stats
    once both sides are closed.
    """

    def __init__(
        self,
        *,
        buffer_size: int = DEFAULT_BUFFER_SIZE,
        tap: Tap | None = None,
        idle_timeout: float | None = None,
    ) -> None:
        if buffer_size < 1024:
            raise ValueError("relay buffer_size must be at least 1024 bytes")
        if idle_timeout is not None and idle_timeout <= 0:
            raise ValueError("idle_timeout must be positive")
        self._loop = asyncio.get_running_loop()
        self.tap = tap
        self.idle_timeout = idle_timeout
        self.started = False
        self._a = _Endpoint(self, A_TO_B, buffer_size)
        self._b = _Endpoint(self, B_TO_A, buffer_size)
        self._a.peer, self._b.peer = self._b, self._a
        self._done: asyncio.Future[RelayStats] = self._loop.create_future()
        self._reason = ""
        self._error: BaseException | None = None
        self._idle_handle: asyncio.TimerHandle | None = None
        self._idle_seen = -1
        self._idle_since = 0.0

    # -- wiring ------------------------------------------------------------------------------

    def protocol_a(self) -> asyncio.BufferedProtocol:
        """The protocol for side a, for a `create_server`/`create_connection` factory."""
        return self._a

    def protocol_b(self) -> asyncio.BufferedProtocol:
        """The protocol for side b, for a `create_server`/`create_connection` factory."""
        return self._b

    def attach_a(self, transport: asyncio.BaseTransport, *, pending: bytes = b"", eof: bool = False) -> None:
        """Take over an existing transport as side a.

        `pending` are bytes already read from it that side b must get first; `eof` says its
        peer already finished sending.
        """
        self._take_over(self._a, transport, pending, eof)

    def attach_b(self, transport: asyncio.BaseTransport, *, pending: bytes = b"", eof: bool = False) -> None:
        """Take over an existing transport as side b (see `attach_a`)."""
        self._take_over(self._b, transport, pending, eof)

    async def dial_b(
        self, host: str, port: int, *, dial_timeout: float | None = 10.0, **create_connection_kwargs: Any
    ) -> None:
        """Connect side b to host:port (kwargs go to `loop.create_connection`, e.g. `ssl`).

        On failure side a is closed (its client sees a clean EOF), the relay finishes with
        reason `dial_failed`, and the error is raised.
        """
        if self._a.lost:
            self._dial_failed(ConnectionResetError("side a closed before the dial"))
            raise ConnectionResetError("side a closed before the dial")
        try:
            async with asyncio.timeout(dial_timeout):
                await self._loop.create_connection(lambda: self._b, host, port, **create_connection_kwargs)
        except (OSError, TimeoutError) as exc:
            self._dial_failed(exc)
            raise
        except asyncio.CancelledError:
            self._dial_failed(ConnectionAbortedError("dial cancelled"))
            raise

    # -- observing and ending ----------------------------------------------------------------

    @property
    def stats(self) -> RelayStats:
        """A snapshot; final once `wait()` returned."""
        return RelayStats(self._a.count, self._b.count, self._reason, self._error)

    @property
    def done(self) -> bool:
        return self._done.done()

    def is_reading(self, side: str) -> bool:
        """Whether the relay currently reads side `"a"` or `"b"` (False while back-pressured)."""
        ep = self._a if side == "a" else self._b
        return ep.transport is not None and not ep.lost and bool(ep.transport.is_reading())

    def buffered(self) -> int:
        """Bytes held in user space by both transports' write buffers (bounded by design)."""
        total = 0
        for ep in (self._a, self._b):
            if ep.transport is not None and not ep.lost:
                total += ep.transport.get_write_buffer_size()
        return total

    async def wait(self) -> RelayStats:
        """Wait until both sides are closed."""
        return await asyncio.shield(self._done)

    async def run(self) -> RelayStats:
        """`wait()`, aborting both sides if the waiting task is cancelled."""
        try:
            return await asyncio.shield(self._done)
        except asyncio.CancelledError:
            self.abort()
            raise

    def close(self, reason: str = "closed") -> None:
        """End the relay gracefully: both transports flush what they hold, then close."""
        self._reason = self._reason or reason
        for ep in (self._a, self._b):
            if ep.transport is not None and not ep.lost:
                ep.transport.close()
        self._finish_unattached()

    def abort(self, reason: str = "closed") -> None:
        """End the relay now, dropping buffered bytes (locks, idle timeouts, cancellation)."""
        self._reason = self._reason or reason
        for ep in (self._a, self._b):
            if ep.transport is not None and not ep.lost:
                ep.transport.abort()
        self._finish_unattached()

    # -- internals ---------------------------------------------------------------------------

    def _take_over(self, ep: _Endpoint, transport: Any, pending: bytes, eof: bool) -> None:
        if ep.transport is not None:
            raise RuntimeError("relay side already attached")
        if pending:
            ep.stash.append(bytes(pending))
        ep.eof = eof
        if transport.is_closing():
            # Closing already: its current protocol gets connection_lost, so count it lost now.
            ep.transport = transport
            ep.lost = True
            self._both_attached_check()
            return
        transport.pause_reading()
        transport.set_protocol(ep)
        self._attached(ep, transport)

    def _attached(self, ep: _Endpoint, transport: Any) -> None:
        ep.transport = transport
        ep.keep_open = bool(transport.can_write_eof())
        _set_write_limits(transport)
        self._both_attached_check()

    def _both_attached_check(self) -> None:
        a, b = self._a, self._b
        if self.started or a.transport is None or b.transport is None:
            return
        self.started = True
        if a.lost or b.lost:
            for ep in (a, b):
                if not ep.lost:
                    ep.transport.close()
            self._reason = self._reason or "done"
            self._maybe_finish()
            return
        for ep in (a, b):
            if ep.stash:
                data = b"".join(ep.stash)
                ep.stash.clear()
                ep.count += len(data)
                if self.tap is not None:
                    try:
                        self.tap(ep.direction, memoryview(data))
                    except Exception as exc:
                        self._fail(exc)
                        return
                ep.peer.transport.write(data)
        for ep in (a, b):
            if ep.eof:
                self._forward_eof(ep)
        for ep in (a, b):
            if not ep.eof and not ep.lost and not ep.peer.sink_paused and not ep.transport.is_closing():
                ep.transport.resume_reading()
        if self.idle_timeout is not None and not self._done.done():
            self._idle_since = self._loop.time()
            self._idle_handle = self._loop.call_later(self._idle_tick(), self._check_idle)

    def _forward_eof(self, ep: _Endpoint) -> None:
        """`ep`'s peer finished sending: tell the other side, and close when both are done."""
        sink = ep.peer
        if sink.lost or sink.transport.is_closing():
            return
        if sink.eof:
            self._reason = self._reason or "done"
            for side in (ep, sink):
                if not side.lost and not side.transport.is_closing():
                    side.transport.close()
        elif sink.transport.can_write_eof():
            sink.transport.write_eof()
        else:
            self._reason = self._reason or "done"
            sink.transport.close()

    def _lost(self, ep: _Endpoint, exc: Exception | None) -> None:
        ep.lost = True
        if exc is not None and self._error is None:
            self._error = exc
            self._reason = self._reason or "error"
        self._reason = self._reason or "done"
        other = ep.peer
        if other.transport is not None and not other.lost:
            if exc is None:
                other.transport.close()
            else:
                other.transport.abort()
        self._maybe_finish()

    def _fail(self, exc: BaseException) -> None:
        log.warning("relay stopped: %s", exc, exc_info=exc)
        if self._error is None:
            self._error = exc
        self.abort("error")

    def _dial_failed(self, exc: BaseException) -> None:
        self._error = exc
        self._reason = "dial_failed"
        self._b.lost = True
        a = self._a
        if a.transport is not None and not a.lost:
            a.transport.close()
        self._maybe_finish()

    def _finish_unattached(self) -> None:
        """A side that never got a transport cannot report connection_lost: count it lost."""
        for ep in (self._a, self._b):
            if ep.transport is None:
                ep.lost = True
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        if self._a.lost and self._b.lost and not self._done.done():
            if self._idle_handle is not None:
                self._idle_handle.cancel()
                self._idle_handle = None
            self._done.set_result(self.stats)

    def _idle_tick(self) -> float:
        assert self.idle_timeout is not None
        return max(self.idle_timeout / 4, 0.01)

    def _check_idle(self) -> None:
        """Counts are already kept per chunk, so idleness costs nothing on the hot path."""
        self._idle_handle = None
        if self._done.done() or self.idle_timeout is None:
            return
        now = self._loop.time()
        seen = self._a.count + self._b.count
        if seen != self._idle_seen:
            self._idle_seen = seen
            self._idle_since = now
        elif now - self._idle_since >= self.idle_timeout:
            log.debug("relay idle for %.1fs: closing", now - self._idle_since)
            self.abort("idle")
            return
        self._idle_handle = self._loop.call_later(self._idle_tick(), self._check_idle)


async def relay(
    a: asyncio.BaseTransport,
    b: asyncio.BaseTransport,
    *,
    a_pending: bytes = b"",
    b_pending: bytes = b"",
    a_eof: bool = False,
    b_eof: bool = False,
    buffer_size: int = DEFAULT_BUFFER_SIZE,
    tap: Tap | None = None,
    idle_timeout: float | None = None,
) -> RelayStats:
    """Relay between two connected transports until both are closed.

    `a_pending` are bytes already read from `a` that `b` must get first (and vice versa);
    `a_eof` says `a`'s peer already finished sending. Cancelling the caller aborts both sides.
    """
    r = Relay(buffer_size=buffer_size, tap=tap, idle_timeout=idle_timeout)
    r.attach_a(a, pending=a_pending, eof=a_eof)
    r.attach_b(b, pending=b_pending, eof=b_eof)
    return await r.run()


async def dial_and_relay(
    a: asyncio.BaseTransport,
    host: str,
    port: int,
    *,
    pending: bytes = b"",
    eof: bool = False,
    dial_timeout: float | None = 10.0,
    buffer_size: int = DEFAULT_BUFFER_SIZE,
    tap: Tap | None = None,
    idle_timeout: float | None = None,
    **create_connection_kwargs: Any,
) -> RelayStats:
    """Take over `a`, dial host:port, and relay until both are closed.

    `a` is paused during the dial, so nothing it sends is lost; if the dial fails `a` is closed
    cleanly and the error (an `OSError`/`TimeoutError`) is raised.
    """
    r = Relay(buffer_size=buffer_size, tap=tap, idle_timeout=idle_timeout)
    r.attach_a(a, pending=pending, eof=eof)
    try:
        await r.dial_b(host, port, dial_timeout=dial_timeout, **create_connection_kwargs)
    except asyncio.CancelledError:
        r.abort()
        raise
    return await r.run()


async def start_forwarder(
    host: str,
    port: int,
    target_host: str,
    target_port: int,
    *,
    buffer_size: int = DEFAULT_BUFFER_SIZE,
    tap: Tap | None = None,
    idle_timeout: float | None = None,
    dial_timeout: float | None = 10.0,
    **create_server_kwargs: Any,
) -> asyncio.AbstractServer:
    """A plain TCP forwarder: every accepted connection is relayed to target_host:target_port.

    Used by local proxies and benchmarks; a refused target closes the client cleanly.
    """
    loop = asyncio.get_running_loop()
    dials: set[asyncio.Task[None]] = set()

    async def dial(r: Relay) -> None:
        try:
            await r.dial_b(target_host, target_port, dial_timeout=dial_timeout)
        except (OSError, TimeoutError) as exc:
            log.debug("forwarder: dial %s:%d failed: %s", target_host, target_port, exc)

    def factory() -> asyncio.BufferedProtocol:
        r = Relay(buffer_size=buffer_size, tap=tap, idle_timeout=idle_timeout)
        task = loop.create_task(dial(r))
        dials.add(task)
        task.add_done_callback(dials.discard)
        return r.protocol_a()

    return await loop.create_server(factory, host, port, **create_server_kwargs)


# -- splice: plain socket to plain socket without the bytes entering Python ------------------

SPLICE_CHUNK = 1 << 20
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_MAX_SPLICES_PER_WAKEUP = 16


def splice_available() -> bool:
    """`os.splice` exists on Linux with Python 3.10+."""
    return hasattr(os, "splice")


class _SpliceDirection:
    """src → pipe → dst, driven by readiness callbacks; the pipe is the only buffer."""

    def __init__(self, owner: _SpliceRelay, src: socket.socket, dst: socket.socket, chunk: int) -> None:
        self.owner = owner
        self.src = src
        self.dst = dst
        self.src_fd = src.fileno()
        self.dst_fd = dst.fileno()
        self.pipe_r, self.pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        with contextlib.suppress(OSError):
            fcntl.fcntl(self.pipe_w, _F_SETPIPE_SZ, chunk)
        self.chunk = chunk
        self.in_pipe = 0
        self.count = 0
        self.eof = False
        self.done = False

    def start(self) -> None:
        self.owner.loop.add_reader(self.src_fd, self.on_readable)

    def on_readable(self) -> None:
        for _ in range(_MAX_SPLICES_PER_WAKEUP):
            try:
                n = os.splice(self.src_fd, self.pipe_w, self.chunk, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                return
            except OSError as exc:
                self.owner.fail(exc)
                return
            if n == 0:
                self.eof = True
                self.owner.loop.remove_reader(self.src_fd)
                if self.in_pipe == 0:
                    self.finish()
                return
            self.in_pipe += n
            self.count += n
            if not self.drain():
                # The destination is full: stop reading until it takes what the pipe holds.
                self.owner.loop.remove_reader(self.src_fd)
                self.owner.loop.add_writer(self.dst_fd, self.on_writable)
                return

    def on_writable(self) -> None:
        if not self.drain():
            return
        self.owner.loop.remove_writer(self.dst_fd)
        if self.eof:
            self.finish()
        else:
            self.owner.loop.add_reader(self.src_fd, self.on_readable)

    def drain(self) -> bool:
        """Move the pipe into dst; False if dst would block before the pipe is empty."""
        while self.in_pipe:
            try:
                n = os.splice(self.pipe_r, self.dst_fd, self.in_pipe, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                return False
            except OSError as exc:
                self.owner.fail(exc)
                return False
            self.in_pipe -= n
        return True

    def finish(self) -> None:
        """All of src's bytes are in dst: pass the EOF on as a half-close."""
        self.done = True
        try:
            self.dst.shutdown(socket.SHUT_WR)
        except OSError as exc:
            if exc.errno not in (errno.ENOTCONN, errno.EPIPE):
                self.owner.fail(exc)
                return
        self.owner.maybe_finish()

    def stop(self) -> None:
        loop = self.owner.loop
        loop.remove_reader(self.src_fd)
        loop.remove_writer(self.dst_fd)
        for fd in (self.pipe_r, self.pipe_w):
            with contextlib.suppress(OSError):
                os.close(fd)


class _SpliceRelay:
    def __init__(
        self, sock_a: socket.socket, sock_b: socket.socket, chunk: int, idle_timeout: float | None
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.socks = (sock_a, sock_b)
        for s in self.socks:
            s.setblocking(False)
            if s.family in (socket.AF_INET, socket.AF_INET6):
                # Interactive sessions ride this too: never let Nagle hold a keystroke back.
                with contextlib.suppress(OSError):
                    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.ab = _SpliceDirection(self, sock_a, sock_b, chunk)
        self.ba = _SpliceDirection(self, sock_b, sock_a, chunk)
        self.done: asyncio.Future[RelayStats] = self.loop.create_future()
        self.reason = ""
        self.error: BaseException | None = None
        self.idle_timeout = idle_timeout
        self.idle_handle: asyncio.TimerHandle | None = None
        self.idle_seen = -1
        self.idle_since = self.loop.time()

    def start(self) -> None:
        self.ab.start()
        self.ba.start()
        if self.idle_timeout is not None:
            self.idle_handle = self.loop.call_later(max(self.idle_timeout / 4, 0.01), self.check_idle)

    def check_idle(self) -> None:
        assert self.idle_timeout is not None
        now = self.loop.time()
        seen = self.ab.count + self.ba.count
        if seen != self.idle_seen:
            self.idle_seen, self.idle_since = seen, now
        elif now - self.idle_since >= self.idle_timeout:
            self.end("idle")
            return
        self.idle_handle = self.loop.call_later(max(self.idle_timeout / 4, 0.01), self.check_idle)

    def fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        self.end("error")

    def maybe_finish(self) -> None:
        if self.ab.done and self.ba.done:
            self.end("done")

    def end(self, reason: str) -> None:
        if self.done.done():
            return
        self.reason = self.reason or reason
        if self.idle_handle is not None:
            self.idle_handle.cancel()
        self.ab.stop()
        self.ba.stop()
        for s in self.socks:
            if reason != "done":
                # Drop unsent bytes and tell the peer with a reset, as abort() would.
                with contextlib.suppress(OSError):
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
        self.done.set_result(RelayStats(self.ab.count, self.ba.count, self.reason, self.error))


async def splice_relay(
    sock_a: socket.socket,
    sock_b: socket.socket,
    *,
    chunk: int = SPLICE_CHUNK,
    idle_timeout: float | None = None,
) -> RelayStats:
    """Relay two connected plain sockets with `os.splice` (Linux); closes both when done.

    Same contract as `relay` (half-close propagated, back-pressure by readiness, idle timeout),
    without a tap: the bytes never reach Python. Cancelling the caller resets both sockets.
    """
    if not splice_available():
        raise RuntimeError("os.splice is not available on this platform")
    r = _SpliceRelay(sock_a, sock_b, chunk, idle_timeout)
    r.start()
    try:
        return await asyncio.shield(r.done)
    except asyncio.CancelledError:
        r.end("closed")
        raise
