"""The one-port TLS router with real TLS clients (Python ssl, aiohttp, openssl s_client)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import socket
import ssl
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
import uvloop
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from wardgate.api.identityfile import load_key_pair
from wardgate.protocols.ping import PingDecoder, frame
from wardgate.proxy.router import TLSConnection, TLSRouter, server_context

MiB = 1 << 20


def run(coro: Coroutine[Any, Any, None]) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(20):
            await coro

    uvloop.run(bounded())


# -- a throw-away PKI -------------------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    cert_pem: str
    key_pem: str
    der: bytes


def _pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def _issue(
    name: str,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool = False,
    server: bool = False,
) -> tuple[Pair, x509.Name, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name, issuer_key = issuer if issuer else (subject, key)
    now = datetime.now(UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        b = b.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
    elif server:
        b = b.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.DNSName("*.example.com")]),
            critical=False,
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    else:
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    cert = b.sign(issuer_key, hashes.SHA256())
    pair = Pair(
        cert.public_bytes(serialization.Encoding.PEM).decode(),
        _pem(key),
        cert.public_bytes(serialization.Encoding.DER),
    )
    return pair, subject, key


CA, _CA_NAME, _CA_KEY = _issue("wardgate test CA", None, ca=True)
SERVER, _, _ = _issue("proxy", (_CA_NAME, _CA_KEY), server=True)
ALICE, _, _ = _issue("alice", (_CA_NAME, _CA_KEY))
_OTHER_CA, _OTHER_NAME, _OTHER_KEY = _issue("someone else's CA", None, ca=True)
MALLORY, _, _ = _issue("mallory", (_OTHER_NAME, _OTHER_KEY))


def client_context(alpn: list[str] | None = None, cert: Pair | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=CA.cert_pem)
    ctx.check_hostname = False  # SNI varies per test; the chain is still verified against our CA
    if alpn:
        ctx.set_alpn_protocols(alpn)
    if cert:
        load_key_pair(ctx, cert.cert_pem, cert.key_pem)
    return ctx


def client_hello(sni: str = "localhost", alpn: list[str] | None = None) -> bytes:
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = client_context(alpn).wrap_bio(incoming, outgoing, server_hostname=sni)
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


# -- handlers and a router to test ------------------------------------------------------------


class TagEcho(asyncio.Protocol):
    """Says who routed it and what it saw, then echoes."""

    def __init__(self, tag: str, conn: TLSConnection) -> None:
        cert = hashlib.sha256(conn.peer_cert).hexdigest()[:16] if conn.peer_cert else "-"
        self.greeting = f"{tag} alpn={conn.alpn} ping={conn.ping} sni={conn.sni} cert={cert}\n".encode()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport
        transport.write(self.greeting)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def eof_received(self) -> bool:
        self.transport.close()
        return False


def tag_echo(tag: str) -> Any:
    def handler(conn: TLSConnection) -> None:
        conn.attach(TagEcho(tag, conn))

    return handler


def fingerprint(pair: Pair) -> str:
    return hashlib.sha256(pair.der).hexdigest()[:16]


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(MiB):
            writer.write(data)
            await writer.drain()
    writer.close()


@contextlib.asynccontextmanager
async def proxy(**opts: Any) -> AsyncIterator[tuple[TLSRouter, int]]:
    """A router with ssh/auth (attached protocols), tunnel (relayed to an echo server), kube by
    SNI, and a web default."""
    echo_server = await asyncio.start_server(echo, "127.0.0.1", 0)
    echo_port = echo_server.sockets[0].getsockname()[1]
    ctx = server_context(SERVER.cert_pem, SERVER.key_pem, client_ca_pems=[CA.cert_pem])
    router = TLSRouter(ctx, **opts)
    router.add_route("ward-ssh", tag_echo("ssh"))
    router.add_sni_route("kube.", tag_echo("kube"))
    router.set_default(tag_echo("web"))

    async def tunnel(conn: TLSConnection) -> None:
        await conn.relay_to("127.0.0.1", echo_port)

    async def late(conn: TLSConnection) -> None:
        await asyncio.sleep(0.05)  # bytes the client sends meanwhile must be kept for us
        conn.attach(TagEcho("auth", conn))

    router.add_route("ward-tunnel", tunnel)
    router.add_route("ward-auth", late)
    _, port = await router.start("127.0.0.1", 0)
    try:
        yield router, port
    finally:
        await router.close()
        echo_server.close()
        await echo_server.wait_closed()
    assert router.pending_handshakes == 0


async def connect(
    port: int, alpn: list[str] | None = None, sni: str = "localhost", cert: Pair | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(
        "127.0.0.1", port, ssl=client_context(alpn, cert), server_hostname=sni, limit=4 * MiB
    )


async def greet(port: int, **kw: Any) -> str:
    reader, writer = await connect(port, **kw)
    line = (await reader.readline()).decode().strip()
    writer.write(b"echo?")
    assert await reader.readexactly(5) == b"echo?"
    writer.close()
    return line


# -- routing ----------------------------------------------------------------------------------


def test_routes_by_alpn_then_sni_then_default() -> None:
    async def main() -> None:
        async with proxy() as (router, port):
            kube = "kube.example.com"
            assert await greet(port, alpn=["ward-ssh"]) == "ssh alpn=ward-ssh ping=False sni=localhost cert=-"
            assert (
                await greet(port, alpn=["h2", "http/1.1"])
                == "web alpn=http/1.1 ping=False sni=localhost cert=-"
            )
            assert await greet(port, alpn=["whatever"]) == "web alpn=None ping=False sni=localhost cert=-"
            assert await greet(port) == "web alpn=None ping=False sni=localhost cert=-"
            assert await greet(port, sni=kube) == f"kube alpn=None ping=False sni={kube} cert=-"
            assert (
                await greet(port, sni=kube, alpn=["http/1.1"])
                == f"kube alpn=http/1.1 ping=False sni={kube} cert=-"
            )
            # An ALPN with a route of its own wins over the SNI prefix.
            assert (
                await greet(port, sni=kube, alpn=["ward-ssh"])
                == f"ssh alpn=ward-ssh ping=False sni={kube} cert=-"
            )
        assert router.stats["route:ward-ssh"] == 2
        assert router.stats["route:default"] == 3
        assert router.stats["route:sni:kube."] == 2
        assert router.stats["routed"] == 7

    run(main())


def test_sni_matcher_routes_names_a_predicate_accepts() -> None:
    """App hosts: a predicate over the SNI, after ALPN routes, before the default."""

    async def main() -> None:
        apps = {"grafana.example.com"}
        seen: list[str] = []

        def is_app(name: str) -> bool:
            seen.append(name)
            if name == "boom.example.com":
                raise RuntimeError("matcher bug")
            return name in apps

        async with proxy() as (router, port):
            router.add_sni_matcher("app", is_app, tag_echo("app"))
            with pytest.raises(ValueError, match="duplicate"):
                router.add_sni_matcher("app", is_app, tag_echo("again"))
            host = "grafana.example.com"
            for alpn in (["http/1.1"], None):
                got = await greet(port, sni="GraFana.Example.com", alpn=alpn)
                assert got.startswith("app ") and got.endswith("cert=-")
            assert seen[-1] == host  # lower-cased
            # An ALPN with its own route keeps it whatever the name.
            assert (await greet(port, sni=host, alpn=["ward-ssh"])).startswith("ssh alpn=ward-ssh")
            # Prefix routes added earlier are tried first; names nobody claims go to the web.
            assert (await greet(port, sni="kube.example.com")).startswith("kube ")
            assert (await greet(port, sni="other.example.com", alpn=["http/1.1"])).startswith("web ")
            apps.add("other.example.com")  # the predicate is asked per connection
            assert (await greet(port, sni="other.example.com", alpn=["http/1.1"])).startswith("app ")
            # A failing matcher is logged and counted, and the connection still gets served.
            assert (await greet(port, sni="boom.example.com")).startswith("web ")
        assert router.stats["route:sni:app"] == 3
        assert router.stats["sni_matcher_error"] == 1
        assert "kube.example.com" not in seen

    run(main())


def test_advertised_alpns_put_ping_variants_first() -> None:
    async def main() -> None:
        async with proxy() as (router, _):
            assert router.advertised_alpns() == [
                "ward-ssh-ping",
                "ward-tunnel-ping",
                "ward-auth-ping",
                "ward-ssh",
                "ward-tunnel",
                "ward-auth",
                "http/1.1",
            ]

    run(main())


def test_client_certificate_is_exposed_and_untrusted_one_refused() -> None:
    async def main() -> None:
        async with proxy() as (router, port):
            line = await greet(port, alpn=["ward-ssh"], cert=ALICE)
            assert line.endswith(f"cert={fingerprint(ALICE)}")
            # TLS 1.3: the client finishes first and learns of the refusal when it reads.
            try:
                reader, writer = await connect(port, alpn=["ward-ssh"], cert=MALLORY)
            except (ssl.SSLError, ConnectionError):
                pass
            else:
                try:
                    line = await reader.readline()
                except (ssl.SSLError, ConnectionError):
                    line = b""
                assert line == b""
                writer.close()
            assert await greet(port, alpn=["ward-ssh"]) == "ssh alpn=ward-ssh ping=False sni=localhost cert=-"
        assert router.stats["handshake_failed"] == 1

    run(main())


def test_tunnel_route_relays_bulk_bytes_intact() -> None:
    async def main() -> None:
        data = random.randbytes(16 * MiB)
        async with proxy() as (_, port):
            reader, writer = await connect(port, alpn=["ward-tunnel"])

            async def send() -> None:
                writer.write(data)
                await writer.drain()

            sender = asyncio.create_task(send())
            got = await reader.readexactly(len(data))
            await sender
            writer.close()
        assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()

    run(main())


def test_bytes_sent_before_the_handler_takes_the_stream_are_kept() -> None:
    async def main() -> None:
        async with proxy() as (_, port):
            reader, writer = await connect(port, alpn=["ward-auth"])
            writer.write(b"early bytes")
            assert await reader.readline() == b"auth alpn=ward-auth ping=False sni=localhost cert=-\n"
            assert await reader.readexactly(11) == b"early bytes"
            writer.close()

    run(main())


def test_many_clients_at_once() -> None:
    async def main() -> None:
        async with proxy() as (router, port):
            alpns = [["ward-ssh"], ["ward-tunnel"], ["http/1.1"], None] * 25

            async def one(alpn: list[str] | None) -> bytes:
                reader, writer = await connect(port, alpn=alpn)
                msg = random.randbytes(50_000)
                writer.write(msg)
                if alpn != ["ward-tunnel"]:
                    await reader.readline()
                got = await reader.readexactly(len(msg))
                writer.close()
                return got == msg

            assert all(await asyncio.gather(*(one(a) for a in alpns)))
        assert router.stats["routed"] == 100

    run(main())


# -- the -ping variant ------------------------------------------------------------------------


async def read_frames(reader: asyncio.StreamReader, dec: PingDecoder, until: int) -> bytes:
    out = bytearray()
    while len(out) < until:
        chunk = await reader.read(MiB)
        assert chunk, "stream ended"
        out += b"".join(dec.feed(chunk))
    return bytes(out)


def test_ping_variant_frames_and_sends_keepalives() -> None:
    async def main() -> None:
        async with proxy(ping_interval=0.05) as (_, port):
            reader, writer = await connect(port, alpn=["ward-ssh-ping", "ward-ssh"])
            dec = PingDecoder()
            greeting = b"ssh alpn=ward-ssh ping=True sni=localhost cert=-\n"
            assert await read_frames(reader, dec, len(greeting)) == greeting
            writer.write(frame(b"hello") + b"\x00\x00\x00\x00" + frame(b" world"))
            assert await read_frames(reader, dec, 11) == b"hello world"
            while dec.keepalives < 3:
                assert await read_frames(reader, dec, 0) == b""
                assert b"".join(dec.feed(await reader.read(MiB))) == b""
            writer.close()

    run(main())


def test_ping_variant_through_the_relay() -> None:
    async def main() -> None:
        data = random.randbytes(3 * MiB)
        async with proxy(ping_interval=0.05) as (_, port):
            reader, writer = await connect(port, alpn=["ward-tunnel-ping"])
            writer.write(frame(data))
            dec = PingDecoder()
            assert await read_frames(reader, dec, len(data)) == data
            writer.close()

    run(main())


def test_ping_variant_relay_honours_a_slow_target() -> None:
    """Framed bytes in, a target that reads slowly: the relay must pause, not reuse live buffers."""

    async def slow_digest(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        size = int.from_bytes(await reader.readexactly(8), "big")
        digest = hashlib.sha256()
        while size:
            chunk = await reader.read(min(size, 64 * 1024))
            digest.update(chunk)
            size -= len(chunk)
            await asyncio.sleep(0.001)
        writer.write(digest.digest())
        await writer.drain()
        writer.close()

    async def main() -> None:
        data = random.randbytes(24 * MiB)
        target = await asyncio.start_server(slow_digest, "127.0.0.1", 0)
        target_port = target.sockets[0].getsockname()[1]
        try:
            async with proxy(ping_interval=0.01) as (router, port):

                async def tcp(conn: TLSConnection) -> None:
                    await conn.relay_to("127.0.0.1", target_port)

                router.add_route("ward-tcp", tcp)
                reader, writer = await connect(port, alpn=["ward-tcp-ping"])
                writer.write(frame(len(data).to_bytes(8, "big")))
                for i in range(0, len(data), 300_000):
                    writer.write(frame(data[i : i + 300_000]))
                await writer.drain()
                assert await read_frames(reader, PingDecoder(), 32) == hashlib.sha256(data).digest()
                writer.close()
        finally:
            target.close()
            await target.wait_closed()

    run(main())


# -- what is not a good TLS client ------------------------------------------------------------


async def raw(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def read_to_end(reader: asyncio.StreamReader) -> bytes:
    try:
        return await reader.read()
    except ConnectionResetError:
        return b"<reset>"


def test_plain_http_is_told_to_use_https() -> None:
    async def main() -> None:
        async with proxy() as (router, port):
            reader, writer = await raw(port)
            writer.write(b"GET / HTTP/1.1\r\nHost: proxy\r\n\r\n")
            reply = await read_to_end(reader)
            writer.close()
        assert reply.startswith(b"HTTP/1.1 400 Bad Request\r\n")
        assert b"use https://" in reply
        assert router.stats["rejected_plain_http"] == 1

    run(main())


def test_bad_clients_are_closed_while_a_good_one_works() -> None:
    async def main() -> None:
        hello = client_hello(alpn=["ward-ssh"])
        async with proxy(handshake_timeout=0.5) as (router, port):
            # Garbage: closed at once.
            garbage_r, garbage_w = await raw(port)
            garbage_w.write(b"\x00\x01\x02garbage that is not TLS")
            # Truncated ClientHello, then silence: closed at the deadline.
            trunc_r, trunc_w = await raw(port)
            trunc_w.write(hello[:60])
            # Truncated ClientHello, then EOF: closed as soon as the EOF arrives.
            eof_r, eof_w = await raw(port)
            eof_w.write(hello[:60])
            eof_w.write_eof()
            # Slowloris: a real ClientHello, one byte at a time.
            slow_r, slow_w = await raw(port)

            async def drip() -> None:
                with contextlib.suppress(ConnectionError):
                    for i in range(len(hello)):
                        slow_w.write(hello[i : i + 1])
                        await slow_w.drain()
                        await asyncio.sleep(0.02)

            dripper = asyncio.create_task(drip())
            # A port scanner: connects and says nothing.
            scan_r, scan_w = await raw(port)
            # Meanwhile a good client is served as usual.
            assert await greet(port, alpn=["ward-ssh"]) == "ssh alpn=ward-ssh ping=False sni=localhost cert=-"
            for reader in (garbage_r, trunc_r, eof_r, slow_r, scan_r):
                assert await read_to_end(reader) in (b"", b"<reset>")
            dripper.cancel()
            for w in (garbage_w, trunc_w, eof_w, slow_w, scan_w):
                w.close()
            assert await greet(port, alpn=["ward-ssh"]) == "ssh alpn=ward-ssh ping=False sni=localhost cert=-"
        assert router.stats["rejected_not_tls"] == 1
        assert router.stats["closed_before_hello"] == 1
        assert router.stats["handshake_timeout"] == 3
        assert router.stats["routed"] == 2

    run(main())


def test_handshake_deadline_covers_a_stalled_tls_handshake() -> None:
    async def main() -> None:
        async with proxy(handshake_timeout=0.5) as (router, port):
            reader, writer = await raw(port)
            writer.write(client_hello(alpn=["ward-ssh"]))  # a whole hello, then no Finished
            assert (await reader.read(5))[:1] == b"\x16"  # the ServerHello came back
            await read_to_end(reader)  # returns only once the router gives up on us
            writer.close()
        assert router.stats["handshake_timeout"] == 1

    run(main())


def test_handler_that_fails_or_forgets_the_stream_closes_it() -> None:
    async def main() -> None:
        async with proxy() as (router, port):

            def forgetful(conn: TLSConnection) -> None:
                return None

            def broken(conn: TLSConnection) -> None:
                raise RuntimeError("handler bug")

            router.add_route("ward-mysql", forgetful)
            router.add_route("ward-postgres", broken)
            for alpn in ("ward-mysql", "ward-postgres"):
                reader, writer = await connect(port, alpn=[alpn])
                assert await read_to_end(reader) in (b"", b"<reset>")
                writer.close()
        assert router.stats["handler_error"] == 1
        assert router.stats["route:ward-mysql"] == 1

    run(main())


# -- handing the stream to aiohttp and to openssl ---------------------------------------------


def test_web_default_hands_the_stream_to_aiohttp() -> None:
    async def main() -> None:
        async def hello(request: web.BaseRequest) -> web.Response:
            peer = request.transport.get_extra_info("peername") if request.transport else None
            return web.Response(text=f"hello over {request.scheme} from {peer[0] if peer else '?'}")

        web_server = web.Server(hello)
        ctx = server_context(SERVER.cert_pem, SERVER.key_pem)
        router = TLSRouter(ctx)
        router.set_default(lambda conn: conn.attach(web_server()))
        _, port = await router.start()
        try:
            tls = client_context()
            async with aiohttp.ClientSession() as session:
                for _ in range(3):  # keep-alive: the same stream serves several requests
                    async with session.get(f"https://localhost:{port}/", ssl=tls) as resp:
                        assert resp.status == 200
                        assert await resp.text() == "hello over https from 127.0.0.1"
        finally:
            await web_server.shutdown(1.0)
            await router.close()
        assert router.stats["route:default"] == 1

    run(main())


def test_openssl_s_client_is_routed_by_alpn() -> None:
    async def main() -> None:
        async with proxy() as (_, port):
            argv = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-alpn", "ward-ssh"]
            argv += ["-servername", "node.example.com", "-quiet"]
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL,
            )
            assert proc.stdin is not None and proc.stdout is not None
            try:
                greeting = await proc.stdout.readline()
                assert greeting == b"ssh alpn=ward-ssh ping=False sni=node.example.com cert=-\n"
                proc.stdin.write(b"hello from openssl\n")
                await proc.stdin.drain()
                assert await proc.stdout.readline() == b"hello from openssl\n"
            finally:
                proc.kill()
                await proc.wait()

    run(main())


def test_close_drops_unrouted_connections() -> None:
    async def main() -> None:
        ctx = server_context(SERVER.cert_pem, SERVER.key_pem)
        router = TLSRouter(ctx, handshake_timeout=30)
        router.set_default(tag_echo("web"))
        _, port = await router.start()
        reader, writer = await raw(port)
        writer.write(client_hello()[:10])
        while router.pending_handshakes == 0:
            await asyncio.sleep(0.01)
        await router.close()
        assert router.pending_handshakes == 0
        assert await read_to_end(reader) in (b"", b"<reset>")
        writer.close()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()

    run(main())
