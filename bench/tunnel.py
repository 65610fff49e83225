"""Reverse-tunnel throughput: bytes through one tunnel channel vs direct TCP and direct TLS.

    .venv/bin/python bench/tunnel.py [--mib 256] [--runs 3]

Everything runs in this one process on one uvloop loop (sender, proxy, agent, receiver), as the
all-in-one `wardgate start` does, so both ends share a core: compare the ratios and the CPU
seconds per GiB, not the absolute speeds. Rows:

- direct TCP: asyncio streams over loopback TCP (the floor any stream path pays);
- direct TLS: the same over TLS 1.3 (what a relay of a client's TLS stream pays at least);
- tunnel: `TunnelServer.dial` → channel → the agent's `on_connection`, proxy→agent and
  agent→proxy, with the SSH cipher of the row (TLS underneath, as in production);
- tunnel x4: four channels at once over one tunnel, a quarter of the bytes each.

Each row sends the bytes, half-closes, and stops the clock when the receiver has counted them
all and answered; the best of `--runs` is reported.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ssl
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import stdlib_http  # noqa: F401 - before anything imports http: bench/http.py would shadow it

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import uvloop
from cryptography.hazmat.primitives.serialization import Encoding

import wardgate.agent.tunnel as agent_tunnel
import wardgate.proxy.tunnel as proxy_tunnel
from wardgate.agent.tunnel import TUNNEL_ALPN, TunnelAgent
from wardgate.api.identityfile import server_trusting_context
from wardgate.auth.ca import CertSigner, new_cert_authority
from wardgate.auth.identity import Identity
from wardgate.keys import generate_tls_key, private_key_pem
from wardgate.proxy.router import TLSRouter, server_context
from wardgate.proxy.tunnel import TunnelServer

MiB = 1 << 20
CHUNK = 256 * 1024
BLOCK = bytes(range(256)) * (CHUNK // 256)


@dataclass
class Row:
    name: str
    mib: int
    seconds: float
    cpu: float

    @property
    def rate(self) -> float:
        return self.mib / self.seconds

    @property
    def cpu_per_gib(self) -> float:
        return self.cpu / (self.mib / 1024)


async def send(writer: Any, nbytes: int) -> None:
    left = nbytes
    while left > 0:
        n = min(left, CHUNK)
        writer.write(BLOCK[:n])
        left -= n
        await writer.drain()
    writer.write_eof()


async def sink(reader: Any, writer: Any) -> None:
    """Count until EOF, then answer with the count (the sender's clock stops on it)."""
    total = 0
    while data := await reader.read(CHUNK):
        total += len(data)
    writer.write(str(total).encode())
    with contextlib.suppress(Exception):
        writer.write_eof()
    writer.close()


async def transfer(reader: Any, writer: Any, nbytes: int) -> None:
    await send(writer, nbytes)
    answer = await reader.read()
    if int(answer or b"0") != nbytes:
        raise RuntimeError(f"receiver counted {answer!r}, expected {nbytes}")
    writer.close()


async def timed(name: str, mib: int, runs: int, once: Callable[[], Awaitable[None]]) -> Row:
    best: Row | None = None
    for _ in range(runs):
        c0, t0 = time.process_time(), time.perf_counter()
        await once()
        row = Row(name, mib, time.perf_counter() - t0, time.process_time() - c0)
        if best is None or row.seconds < best.seconds:
            best = row
    assert best is not None
    return best


class Certs:
    def __init__(self) -> None:
        self.host = CertSigner(new_cert_authority("host", "bench.example"))
        self.ca_pem = self.host.tls_ca_cert.public_bytes(Encoding.PEM).decode()

    def pair(self, host_id: str, role: str) -> tuple[str, str]:
        key = generate_tls_key()
        ident = Identity(user=host_id, system_role=role, host_id=host_id)
        cert = self.host.sign_tls_cert(
            key.public_key(), ident, ttl=timedelta(hours=1), dns_names=["localhost"]
        )
        return cert, private_key_pem(key)


@contextlib.asynccontextmanager
async def tcp_server(handler: Callable[[Any, Any], Awaitable[None]], **kw: Any) -> AsyncIterator[int]:
    srv = await asyncio.start_server(handler, "127.0.0.1", 0, **kw)
    try:
        yield srv.sockets[0].getsockname()[1]
    finally:
        srv.close()
        await srv.wait_closed()


@contextlib.asynccontextmanager
async def tunnel(certs: Certs, cipher: str) -> AsyncIterator[tuple[TunnelServer, TunnelAgent]]:
    """A router + tunnel server and one agent whose channels answer with `sink`, or, for
    service `source:<n>`, send n bytes and then read the proxy's count."""
    agent_tunnel.ENCRYPTION_ALGS = proxy_tunnel.ENCRYPTION_ALGS = (cipher,)
    proxy_cert, proxy_key = certs.pair("proxy-1", "proxy")
    router = TLSRouter(server_context(proxy_cert, proxy_key, client_ca_pems=[certs.ca_pem]))
    server = TunnelServer(lambda: [certs.host.tls_ca_cert])
    router.add_route(TUNNEL_ALPN, server.handle)
    host, port = await router.start()

    async def on_connection(service: str, client_addr: str, reader: Any, writer: Any) -> None:
        if service.startswith("source:"):
            await transfer(reader, writer, int(service.split(":", 1)[1]))
        else:
            await sink(reader, writer)

    cert, key = certs.pair("host-1", "node")
    agent = TunnelAgent(
        f"{host}:{port}", cert_pem=cert, key_pem=key, ca_pems=[certs.ca_pem], on_connection=on_connection
    )
    agent.start()
    try:
        await asyncio.wait_for(agent.connected.wait(), 10)
        while server.connected() != ["host-1"]:
            await asyncio.sleep(0.01)
        yield server, agent
    finally:
        await agent.close()
        await router.close()
        await server.close()


async def main(mib: int, runs: int) -> list[Row]:
    nbytes = mib * MiB
    rows: list[Row] = []
    certs = Certs()

    async with tcp_server(sink) as port:

        async def direct_tcp() -> None:
            r, w = await asyncio.open_connection("127.0.0.1", port)
            await transfer(r, w, nbytes)

        rows.append(await timed("direct TCP", mib, runs, direct_tcp))

    # TLS cannot half-close on asyncio streams, so this sink counts a known length instead.
    async def tls_sink(reader: Any, writer: Any) -> None:
        await reader.readexactly(nbytes)
        writer.write(str(nbytes).encode())
        await writer.drain()
        writer.close()

    cert, key = certs.pair("proxy-1", "proxy")
    sctx = server_context(cert, key)
    async with tcp_server(tls_sink, ssl=sctx) as port:
        cctx: ssl.SSLContext = server_trusting_context([certs.ca_pem])

        async def direct_tls() -> None:
            r, w = await asyncio.open_connection("127.0.0.1", port, ssl=cctx, server_hostname="localhost")
            left = nbytes
            while left > 0:
                n = min(left, CHUNK)
                w.write(BLOCK[:n])
                left -= n
                await w.drain()
            if int(await r.read()) != nbytes:
                raise RuntimeError("TLS receiver miscounted")
            w.close()

        rows.append(await timed("direct TLS", mib, runs, direct_tls))

    for cipher in ("aes128-gcm@openssh.com", "chacha20-poly1305@openssh.com"):
        short = cipher.split("@")[0]
        async with tunnel(certs, cipher) as (server, _agent):

            async def to_agent() -> None:
                r, w = await server.dial("host-1", "sink")
                await transfer(r, w, nbytes)

            async def from_agent() -> None:
                r, w = await server.dial("host-1", f"source:{nbytes}")
                await sink(r, w)

            async def four_channels() -> None:
                async def one() -> None:
                    r, w = await server.dial("host-1", "sink")
                    await transfer(r, w, nbytes // 4)

                await asyncio.gather(*(one() for _ in range(4)))

            rows.append(await timed(f"tunnel {short} proxy→agent", mib, runs, to_agent))
            rows.append(await timed(f"tunnel {short} agent→proxy", mib, runs, from_agent))
            rows.append(await timed(f"tunnel {short} x4 proxy→agent", mib, runs, four_channels))
    return rows


def table(rows: list[Row]) -> str:
    base = rows[0].rate
    head = ("path", "MiB", "seconds", "MiB/s", "vs TCP", "CPU s/GiB")
    body = [
        (
            r.name,
            str(r.mib),
            f"{r.seconds:.2f}",
            f"{r.rate:.0f}",
            f"{r.rate / base:.2f}",
            f"{r.cpu_per_gib:.2f}",
        )
        for r in rows
    ]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    lines = [line(x) for x in [head, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=256, help="MiB per row (default 256)")
    parser.add_argument("--runs", type=int, default=3, help="runs per row, best kept (default 3)")
    args = parser.parse_args()
    result = uvloop.run(main(args.mib, args.runs))
    print(f"{args.mib} MiB per row, best of {args.runs}, one process on one uvloop loop")
    print(table(result))
