"""The relay with real sockets on 127.0.0.1: integrity, back-pressure, half-close, failures."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

import pytest
import uvloop

from wardgate.proxy.relay import (
    A_TO_B,
    B_TO_A,
    DEFAULT_BUFFER_SIZE,
    Relay,
    RelayStats,
    dial_and_relay,
    relay,
    splice_available,
    splice_relay,
    start_forwarder,
)

MiB = 1 << 20


def run(coro: Coroutine[Any, Any, None]) -> None:
    """Tests run on uvloop, like the proxy itself, with a hard stop so a bug cannot hang CI."""

    async def bounded() -> None:
        async with asyncio.timeout(20):
            await coro

    uvloop.run(bounded())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def server(
    handle: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> AsyncIterator[int]:
    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield srv.sockets[0].getsockname()[1]
    finally:
        srv.close()
        await srv.wait_closed()


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(MiB):
            writer.write(data)
            await writer.drain()
        writer.close()
    except ConnectionError:
        writer.close()


@contextlib.asynccontextmanager
async def forwarder(target: int, **opts: Any) -> AsyncIterator[int]:
    srv = await start_forwarder("127.0.0.1", 0, "127.0.0.1", target, **opts)
    try:
        yield srv.sockets[0].getsockname()[1]
    finally:
        srv.close()
        await srv.wait_closed()


@contextlib.asynccontextmanager
async def relays_to(target: int, **opts: Any) -> AsyncIterator[tuple[int, list[Relay]]]:
    """Like the forwarder, but the test keeps each Relay to look inside."""
    loop = asyncio.get_running_loop()
    made: list[Relay] = []
    tasks: list[asyncio.Task[None]] = []

    def factory() -> asyncio.BufferedProtocol:
        r = Relay(**opts)
        made.append(r)
        tasks.append(loop.create_task(r.dial_b("127.0.0.1", target)))
        return r.protocol_a()

    srv = await loop.create_server(factory, "127.0.0.1", 0)
    try:
        yield srv.sockets[0].getsockname()[1], made
    finally:
        srv.close()
        await srv.wait_closed()
        for r in made:
            r.abort()
        await asyncio.gather(*tasks, return_exceptions=True)


async def round_trip(port: int, data: bytes) -> bytes:
    """Send everything, half-close, and read the echo to EOF, concurrently."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def send() -> None:
        writer.write(data)
        await writer.drain()
        writer.write_eof()

    sender = asyncio.create_task(send())
    got = bytearray()
    while chunk := await reader.read(MiB):
        got += chunk
    await sender
    writer.close()
    return bytes(got)


def test_64mib_round_trip_is_intact() -> None:
    async def main() -> None:
        data = random.randbytes(64 * MiB)
        async with server(echo) as target, relays_to(target) as (port, made):
            got = await round_trip(port, data)
            stats = await made[0].wait()
        assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
        assert (stats.a_to_b, stats.b_to_a) == (len(data), len(data))
        assert stats.reason == "done" and stats.error is None

    run(main())


def test_default_asyncio_loop_works_too() -> None:
    async def main() -> None:
        data = random.randbytes(8 * MiB)
        async with server(echo) as target, forwarder(target) as port:
            assert await round_trip(port, data) == data

    asyncio.run(main())


def test_slow_reader_pauses_the_relay_instead_of_buffering() -> None:
    total = 96 * MiB
    payload = random.randbytes(MiB)

    async def main() -> None:
        blocked = asyncio.Event()

        async def blaster(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            sent = 0
            while sent < total:
                writer.write(payload)
                sent += len(payload)
                if writer.transport.get_write_buffer_size() > 0:
                    blocked.set()  # the relay stopped taking bytes: back-pressure reached us
                await writer.drain()
            writer.close()

        async with server(blaster) as target, relays_to(target) as (port, made):
            reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=64 * 1024)
            await blocked.wait()
            r = made[0]
            while r.is_reading("b"):
                await asyncio.sleep(0.01)
            # Held in user space: at most the one chunk the client's socket could not take.
            assert r.buffered() <= DEFAULT_BUFFER_SIZE
            assert r.stats.b_to_a < total
            digest = hashlib.sha256()
            n = 0
            while chunk := await reader.read(MiB):
                digest.update(chunk)
                n += len(chunk)
            writer.close()
            assert n == total
            assert digest.digest() == hashlib.sha256(payload * (total // MiB)).digest()

    run(main())


def test_half_close_client_still_gets_the_reply() -> None:
    async def replier(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.read()  # until the client's EOF, which must come through
        writer.write(b"got %d bytes" % len(request))
        await writer.drain()
        writer.close()

    async def main() -> None:
        async with server(replier) as target, relays_to(target) as (port, made):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"x" * 100_000)
            writer.write_eof()
            assert await reader.read() == b"got 100000 bytes"
            writer.close()
            stats = await made[0].wait()
            assert (stats.a_to_b, stats.b_to_a) == (100_000, 16)

    run(main())


def test_refused_target_closes_the_client_cleanly() -> None:
    async def main() -> None:
        dead = free_port()
        async with relays_to(dead) as (port, made):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            assert await reader.read() == b""  # EOF, not a reset
            writer.close()
            stats = await made[0].wait()
            assert stats.reason == "dial_failed"
            assert isinstance(stats.error, ConnectionRefusedError)

    run(main())


def test_dial_and_relay_raises_refused_and_closes_the_accepted_side() -> None:
    async def main() -> None:
        dead = free_port()
        errors: list[BaseException] = []
        done = asyncio.Event()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await dial_and_relay(writer.transport, "127.0.0.1", dead)
            except ConnectionRefusedError as exc:
                errors.append(exc)
            done.set()

        async with server(handle) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            assert await reader.read() == b""
            await done.wait()
            writer.close()
        assert len(errors) == 1

    run(main())


def test_many_concurrent_relays() -> None:
    async def main() -> None:
        async with server(echo) as target, forwarder(target) as port:
            payloads = [random.randbytes(random.randint(1, 200_000)) for _ in range(200)]
            results = await asyncio.gather(*(round_trip(port, p) for p in payloads))
        assert results == payloads

    run(main())


def test_pending_bytes_go_first_and_tap_sees_everything() -> None:
    async def main() -> None:
        seen: dict[str, bytearray] = {A_TO_B: bytearray(), B_TO_A: bytearray()}
        stats: list[RelayStats] = []

        def tap(direction: str, chunk: memoryview) -> None:
            seen[direction] += chunk

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            first = await reader.readexactly(6)  # a handler that read a header before relaying
            _, target_writer = await asyncio.open_connection("127.0.0.1", target)
            stats.append(
                await relay(
                    writer.transport, target_writer.transport, a_pending=first + reader._buffer, tap=tap
                )
            )

        async with server(echo) as target, server(handle) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"HEADERpayload")
            assert await reader.readexactly(13) == b"HEADERpayload"
            writer.write(b"-more")
            writer.write_eof()
            assert await reader.read() == b"-more"
            writer.close()
            while not stats:
                await asyncio.sleep(0.01)
        assert bytes(seen[A_TO_B]) == bytes(seen[B_TO_A]) == b"HEADERpayload-more"
        assert (stats[0].a_to_b, stats[0].b_to_a) == (18, 18)

    run(main())


def test_idle_timeout_ends_a_quiet_relay() -> None:
    async def main() -> None:
        async with server(echo) as target, relays_to(target, idle_timeout=0.2) as (port, made):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"ping")
            assert await reader.readexactly(4) == b"ping"
            with contextlib.suppress(ConnectionError):
                assert await reader.read() == b""
            writer.close()
            stats = await made[0].wait()
        assert stats.reason == "idle"
        assert (stats.a_to_b, stats.b_to_a) == (4, 4)

    run(main())


def test_tap_failure_stops_the_relay() -> None:
    def tap(direction: str, chunk: memoryview) -> None:
        raise OSError("audit disk full")

    async def main() -> None:
        async with server(echo) as target, relays_to(target, tap=tap) as (port, made):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"secret")
            with contextlib.suppress(ConnectionError):
                assert await reader.read() == b""
            writer.close()
            stats = await made[0].wait()
        assert stats.reason == "error"
        assert str(stats.error) == "audit disk full"

    run(main())


def test_cancelling_the_waiter_aborts_both_sides() -> None:
    async def main() -> None:
        async with server(echo) as target:
            started = asyncio.Event()
            tasks: list[asyncio.Task[RelayStats]] = []

            async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                writer.transport.pause_reading()  # bytes wait in the kernel until the relay task runs
                task = asyncio.create_task(dial_and_relay(writer.transport, "127.0.0.1", target))
                tasks.append(task)
                started.set()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

            async with server(handle) as port:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                await started.wait()
                writer.write(b"hello")
                assert await reader.readexactly(5) == b"hello"
                tasks[0].cancel()
                with contextlib.suppress(ConnectionError):
                    assert await reader.read() == b""
                writer.close()
                assert tasks[0].cancelled()

    run(main())


@pytest.mark.skipif(not splice_available(), reason="os.splice is Linux-only")
def test_splice_relay_integrity_half_close_and_counts() -> None:
    async def replier(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.read()
        writer.write(hashlib.sha256(request).digest() + request[::-1])
        await writer.drain()
        writer.close()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        data = random.randbytes(24 * MiB)
        results: list[RelayStats] = []
        async with server(replier) as target:
            lsock = socket.create_server(("127.0.0.1", 0))
            lsock.setblocking(False)

            async def accept_one() -> None:
                client_side, _ = await loop.sock_accept(lsock)
                target_side = socket.socket()
                target_side.setblocking(False)
                await loop.sock_connect(target_side, ("127.0.0.1", target))
                results.append(await splice_relay(client_side, target_side))

            acceptor = asyncio.create_task(accept_one())
            got = await round_trip(lsock.getsockname()[1], data)
            await acceptor
            lsock.close()
        assert got[:32] == hashlib.sha256(data).digest()
        assert got[32:] == data[::-1]
        assert (results[0].a_to_b, results[0].b_to_a, results[0].reason) == (
            len(data),
            len(data) + 32,
            "done",
        )

    run(main())


@pytest.mark.skipif(not splice_available(), reason="os.splice is Linux-only")
def test_splice_relay_idle_timeout() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with server(echo) as target:
            lsock = socket.create_server(("127.0.0.1", 0))
            lsock.setblocking(False)
            results: list[RelayStats] = []

            async def accept_one() -> None:
                client_side, _ = await loop.sock_accept(lsock)
                target_side = socket.create_connection(("127.0.0.1", target))
                results.append(await splice_relay(client_side, target_side, idle_timeout=0.2))

            acceptor = asyncio.create_task(accept_one())
            reader, writer = await asyncio.open_connection("127.0.0.1", lsock.getsockname()[1])
            writer.write(b"ping")
            assert await reader.readexactly(4) == b"ping"
            with contextlib.suppress(ConnectionError):
                assert await reader.read() == b""
            writer.close()
            await acceptor
            lsock.close()
        assert results[0].reason == "idle"

    run(main())
