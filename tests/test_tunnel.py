"""Reverse tunnels with real sockets, the real TLS router and real asyncssh on 127.0.0.1.

An agent dials the router's port with ALPN `ward-tunnel` and its host certificate; the proxy
dials it back by host id. Covered: data integrity and half-close both ways, many channels at
once, the stream relay, refusals (foreign CA, user cert, no cert, non-agent roles, a non-proxy
server), proxy restart on the same port, dead and half-open tunnels, and the errors users see.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from datetime import timedelta
from typing import Any

import pytest
import uvloop
from cryptography.hazmat.primitives.serialization import Encoding

from wardgate.agent.tunnel import TUNNEL_ALPN, TunnelAgent, format_client_addr, parse_client_addr
from wardgate.api.identityfile import load_key_pair, server_trusting_context
from wardgate.auth.ca import CertSigner, new_cert_authority
from wardgate.auth.identity import Identity
from wardgate.errors import LockedError, NotFoundError
from wardgate.keys import generate_tls_key, private_key_pem
from wardgate.proxy.router import TLSConnection, TLSRouter, server_context
from wardgate.proxy.tunnel import TunnelDialError, TunnelServer, pipe

MiB = 1 << 20
HOUR = timedelta(hours=1)
CLUSTER = "test.example"


def run(coro: Coroutine[Any, Any, None]) -> None:
    """On uvloop, like the proxy, with a hard stop so a bug cannot hang the suite."""

    async def bounded() -> None:
        async with asyncio.timeout(20):
            await coro

    uvloop.run(bounded())


async def until(cond: Callable[[], bool], what: str) -> None:
    """Poll for a condition (the outer run() bounds the wait); no timing assertions."""
    while not cond():
        await asyncio.sleep(0.01)
    assert cond(), what


def pem(cert: Any) -> str:
    return cert.public_bytes(Encoding.PEM).decode()


class Cluster:
    """CAs and certificates: the cluster's host and user CAs, plus a foreign host CA."""

    def __init__(self) -> None:
        self.host = CertSigner(new_cert_authority("host", CLUSTER))
        self.user = CertSigner(new_cert_authority("user", CLUSTER))
        self.foreign = CertSigner(new_cert_authority("host", "elsewhere.example"))
        self.ca_pems = [pem(self.host.tls_ca_cert)]

    @staticmethod
    def cert(signer: CertSigner, identity: Identity, **kw: Any) -> tuple[str, str]:
        key = generate_tls_key()
        return signer.sign_tls_cert(key.public_key(), identity, ttl=HOUR, **kw), private_key_pem(key)

    def agent_cert(
        self, host_id: str = "host-1", role: str = "node", signer: CertSigner | None = None
    ) -> tuple[str, str]:
        return self.cert(signer or self.host, Identity(user=host_id, system_role=role, host_id=host_id))

    def user_cert(self) -> tuple[str, str]:
        return self.cert(self.user, Identity(user="alice", roles=("dev",), logins=("root",)))

    def proxy_server_context(self, role: str = "proxy") -> ssl.SSLContext:
        cert, key = self.cert(
            self.host,
            Identity(user="proxy-1", system_role=role, host_id="proxy-1"),
            dns_names=["localhost"],
            ip_addresses=["127.0.0.1"],
        )
        return server_context(
            cert, key, client_ca_pems=[pem(self.host.tls_ca_cert), pem(self.user.tls_ca_cert)]
        )

    def client_context(self, cert: tuple[str, str] | None) -> ssl.SSLContext:
        ctx = server_trusting_context(self.ca_pems)
        if cert is not None:
            load_key_pair(ctx, *cert)
        ctx.set_alpn_protocols([TUNNEL_ALPN])
        return ctx


class Proxy:
    """A router with the tunnel route (and a `ward-tcp` route relaying to host-1's echo)."""

    def __init__(self, cluster: Cluster, *, server_role: str = "proxy", **ts_opts: Any) -> None:
        self.refused: list[tuple[str, str]] = []
        self.refused_ids: list[Identity | None] = []
        self.changes: list[tuple[str, bool]] = []
        self.relayed: list[tuple[int, int]] = []
        self.tunnels = TunnelServer(
            lambda: [cluster.host.tls_ca_cert],
            on_refused=self.on_refused,
            on_change=lambda host_id, up: self.changes.append((host_id, up)),
            **ts_opts,
        )
        self.router = TLSRouter(cluster.proxy_server_context(server_role))
        self.router.add_route(TUNNEL_ALPN, self.tunnels.handle)
        self.router.add_route("ward-tcp", self.relay_tcp)
        self.addr = ""

    def on_refused(self, remote: str, reason: str, identity: Identity | None) -> None:
        self.refused.append((remote, reason))
        self.refused_ids.append(identity)

    async def relay_tcp(self, conn: TLSConnection) -> None:
        self.relayed.append(await self.tunnels.relay(conn, "host-1", "echo"))

    async def start(self, port: int = 0) -> str:
        host, bound = await self.router.start("127.0.0.1", port)
        self.addr = f"{host}:{bound}"
        return self.addr

    async def stop(self) -> None:
        await self.router.close()
        await self.tunnels.close()


@contextlib.asynccontextmanager
async def proxy(cluster: Cluster, port: int = 0, **opts: Any) -> AsyncIterator[Proxy]:
    p = Proxy(cluster, **opts)
    await p.start(port)
    try:
        yield p
    finally:
        await p.stop()


Handler = Callable[[str, str, Any, Any], Awaitable[None]]


async def echo_then_trailer(service: str, client_addr: str, reader: Any, writer: Any) -> None:
    """Echo until EOF, then (half-close proven) send a trailer naming what the channel saw."""
    while data := await reader.read(MiB):
        writer.write(data)
        await writer.drain()
    writer.write(f"|{service}|{client_addr}".encode())
    writer.write_eof()


@contextlib.asynccontextmanager
async def agent(
    cluster: Cluster,
    addr: str,
    handler: Handler = echo_then_trailer,
    cert: tuple[str, str] | None = None,
    **kw: Any,
) -> AsyncIterator[TunnelAgent]:
    cert_pem, key_pem = cert or cluster.agent_cert()
    a = TunnelAgent(
        addr,
        cert_pem=cert_pem,
        key_pem=key_pem,
        ca_pems=cluster.ca_pems,
        on_connection=handler,
        backoff_base=kw.pop("backoff_base", 0.05),
        backoff_max=kw.pop("backoff_max", 0.2),
        **kw,
    )
    a.start()
    try:
        yield a
    finally:
        await a.close()


async def echo_round_trip(p: Proxy, payload: bytes, service: str = "ssh", client_addr: str = "") -> bytes:
    reader, writer = await p.tunnels.dial("host-1", service, client_addr=client_addr)

    async def send() -> None:
        view = memoryview(payload)
        for i in range(0, len(view), MiB):
            writer.write(bytes(view[i : i + MiB]))
            await writer.drain()
        writer.write_eof()

    sender = asyncio.ensure_future(send())
    got = bytearray()
    while data := await reader.read(MiB):
        got += data
    await sender
    writer.close()
    return bytes(got)


# -- data path ----------------------------------------------------------------------------


def test_dial_reaches_agent_with_integrity_and_half_close_both_ways() -> None:
    cluster = Cluster()

    async def main() -> None:
        async with proxy(cluster) as p, agent(cluster, p.addr) as a:
            await asyncio.wait_for(a.connected.wait(), 10)
            await until(lambda: p.tunnels.connected() == ["host-1"], "tunnel registered")
            assert p.changes == [("host-1", True)]
            assert a.proxy_identity is not None and a.proxy_identity.system_role == "proxy"

            # proxy -> agent 32 MiB, echoed back; the agent writes after our EOF (half-close).
            payload = os.urandom(32 * MiB)
            got = await echo_round_trip(p, payload, "ssh", client_addr="203.0.113.7:50022")
            trailer = b"|ssh|203.0.113.7:50022"
            assert got.endswith(trailer)
            assert hashlib.sha256(got[: -len(trailer)]).hexdigest() == hashlib.sha256(payload).hexdigest()

    run(main())


def test_agent_half_closes_first_and_still_receives() -> None:
    cluster = Cluster()
    digest: asyncio.Future[tuple[str, int]] | None = None

    async def sink_after_eof(service: str, client_addr: str, reader: Any, writer: Any) -> None:
        writer.write(b"ready")
        writer.write_eof()  # nothing more from the agent, but it keeps reading
        h, n = hashlib.sha256(), 0
        while data := await reader.read(MiB):
            h.update(data)
            n += len(data)
        assert digest is not None
        digest.set_result((h.hexdigest(), n))

    async def main() -> None:
        nonlocal digest
        digest = asyncio.get_running_loop().create_future()
        async with proxy(cluster) as p, agent(cluster, p.addr, sink_after_eof) as a:
            await asyncio.wait_for(a.connected.wait(), 10)
            await until(lambda: p.tunnels.connected() == ["host-1"], "tunnel registered")
            reader, writer = await p.tunnels.dial("host-1", "sink")
            assert await reader.read() == b"ready"  # read() to EOF: the agent half-closed
            payload = os.urandom(32 * MiB)
            for i in range(0, len(payload), MiB):
                writer.write(payload[i : i + MiB])
                await writer.drain()
            writer.write_eof()
            assert await digest == (hashlib.sha256(payload).hexdigest(), len(payload))
            writer.close()

    run(main())


def test_fifty_concurrent_channels_on_one_tunnel() -> None:
    cluster = Cluster()

    async def main() -> None:
        async with proxy(cluster) as p, agent(cluster, p.addr) as a:
            await asyncio.wait_for(a.connected.wait(), 10)
            await until(lambda: p.tunnels.connected() == ["host-1"], "tunnel registered")
            payloads = [os.urandom(256 * 1024 + i) for i in range(50)]
            results = await asyncio.gather(
                *(
                    echo_round_trip(p, data, f"app:{i}", f"10.0.0.{i}:{1000 + i}")
                    for i, data in enumerate(payloads)
                )
            )
            for i, (data, got) in enumerate(zip(payloads, results, strict=True)):
                assert got == data + f"|app:{i}|10.0.0.{i}:{1000 + i}".encode()
            tunnel = p.tunnels.get("host-1")
            assert tunnel is not None and tunnel.channels_opened == 50

    run(main())


def test_router_route_relays_a_client_tls_stream_through_the_tunnel() -> None:
    cluster = Cluster()

    async def main() -> None:
        async with proxy(cluster) as p, agent(cluster, p.addr) as a:
            await asyncio.wait_for(a.connected.wait(), 10)
            await until(lambda: p.tunnels.connected() == ["host-1"], "tunnel registered")
            ctx = server_trusting_context(cluster.ca_pems)
            ctx.set_alpn_protocols(["ward-tcp"])
            host, port = p.addr.rsplit(":", 1)
            reader, writer = await asyncio.open_connection(
                host, int(port), ssl=ctx, server_hostname="localhost"
            )
            payload = os.urandom(3 * MiB)
            writer.write(payload)
            await writer.drain()
            got = await reader.readexactly(len(payload))
            assert got == payload
            writer.close()  # TLS cannot half-close here: closing ends both directions
            await until(lambda: len(p.relayed) == 1, "relay finished")
            sent, received = p.relayed[0]
            assert sent == len(payload) and received >= len(payload)

    run(main())


def test_pipe_propagates_half_close_between_tcp_and_a_channel() -> None:
    cluster = Cluster()

    async def main() -> None:
        async with proxy(cluster) as p, agent(cluster, p.addr) as a:
            await asyncio.wait_for(a.connected.wait(), 10)
            await until(lambda: p.tunnels.connected() == ["host-1"], "tunnel registered")
            counts: list[tuple[int, int]] = []

            async def front(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                peer = writer.get_extra_info("peername")
                ch_r, ch_w = await p.tunnels.dial("host-1", "tcp", client_addr=format_client_addr(*peer[:2]))
                counts.append(await pipe(reader, writer, ch_r, ch_w))

            srv = await asyncio.start_server(front, "127.0.0.1", 0)
            try:
                port = srv.sockets[0].getsockname()[1]
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                local = writer.get_extra_info("sockname")
                payload = os.urandom(4 * MiB)
                writer.write(payload)
                writer.write_eof()  # TCP half-close travels through pipe to the agent
                got = await reader.read()
                trailer = f"|tcp|127.0.0.1:{local[1]}".encode()
                assert got == payload + trailer
                writer.close()
                await until(lambda: len(counts) == 1, "pipe finished")
                assert counts[0] == (len(payload), len(payload) + len(trailer))
            finally:
                srv.close()
                await srv.wait_closed()

    run(main())


# -- errors users see -----------------------------------------------------------------------


def test_dial_errors_name_the_problem() -> None:
    cluster = Cluster()

    async def failing(service: str, client_addr: str, reader: Any, writer: Any) -> None:
        if service == "boom":
            raise RuntimeError("handler bug")
        await echo_then_trailer(service, client_addr, reader, writer)

    async def main() -> None:
        async with proxy(cluster) as p:
            with pytest.raises(
                NotFoundError, match=r"no tunnel from host nope \(is its agent running and joined\?\)"
            ):
                await p.tunnels.dial("nope", "ssh")
            async with agent(cluster, p.addr, failing, accepts=lambda s: s != "db:secret") as a:
                await asyncio.wait_for(a.connected.wait(), 10)
                await until(lambda: p.tunnels.connected() == ["host-1"], "tunnel registered")
                with pytest.raises(
                    TunnelDialError, match=r"host host-1 refused 'db:secret': .*does not serve"
                ):
                    await p.tunnels.dial("host-1", "db:secret")
                # A handler that crashes closes its own channel only.
                reader, writer = await p.tunnels.dial("host-1", "boom")
                assert await reader.read() == b""
                writer.close()
                assert await echo_round_trip(p, b"still up") == b"still up|ssh|"

    run(main())


def test_client_addr_format_round_trips() -> None:
    for host, port in [("10.1.2.3", 22), ("::1", 443), ("", 0)]:
        assert parse_client_addr(format_client_addr(host, port)) == (host, port)
    assert format_client_addr("::1", 443) == "[::1]:443"


def test_backoff_is_full_jitter_and_capped() -> None:
    cluster = Cluster()
    cert, key = cluster.agent_cert()

    async def main() -> None:
        a = TunnelAgent("127.0.0.1:1", cert_pem=cert, key_pem=key, ca_pems=cluster.ca_pems,
                        on_connection=echo_then_trailer, backoff_base=0.5, backoff_max=4.0)  # fmt: skip
        for attempt in range(10):
            cap = min(4.0, 0.5 * 2**attempt)
            delays = [a.next_delay(attempt) for _ in range(200)]
            assert all(0 <= d <= cap for d in delays)
            assert max(delays) > cap / 2  # spread over the whole range, not a fixed step

    run(main())


# -- refusals -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("who", "reason"),
    [
        ("user", "not signed by a trusted Wardgate CA"),
        ("proxy", "system role 'proxy', not an agent"),
        ("admin", "system role 'admin', not an agent"),
    ],
)
def test_non_agent_certificates_are_refused(who: str, reason: str) -> None:
    cluster = Cluster()
    cert = cluster.user_cert() if who == "user" else cluster.agent_cert("host-x", role=who)

    async def main() -> None:
        async with proxy(cluster) as p, agent(cluster, p.addr, cert=cert) as a:
            await until(lambda: len(p.refused) >= 1, "refusal reported")
            assert reason in p.refused[0][1]
            await until(lambda: bool(a.last_error), "agent saw the failure")
            assert a.last_error.startswith("the proxy refused this agent: ") and reason in a.last_error
            assert p.tunnels.connected() == []
            assert a.connects == 0 and not a.connected.is_set()

    run(main())


def test_authorize_hook_refuses_a_locked_agent() -> None:
    cluster = Cluster()

    def authorize(identity: Identity) -> None:
        if identity.host_id == "host-1":
            raise LockedError("host host-1 is locked: decommissioned")

    async def main() -> None:
        async with proxy(cluster, authorize=authorize) as p, agent(cluster, p.addr) as a:
            await until(lambda: "locked" in a.last_error, "agent told why")
            assert a.last_error == "the proxy refused this agent: host host-1 is locked: decommissioned"
            ident = p.refused_ids[0]
            assert ident is not None and ident.host_id == "host-1" and ident.system_role == "node"
            assert p.tunnels.connected() == [] and a.connects == 0

    run(main())


def test_foreign_ca_is_refused_in_the_tls_handshake() -> None:
    cluster = Cluster()

    async def main() -> None:
        async with (
            proxy(cluster) as p,
            agent(cluster, p.addr, cert=cluster.agent_cert(signer=cluster.foreign)) as a,
        ):
            await until(lambda: p.router.stats["handshake_failed"] >= 1, "handshake refused")
            await until(lambda: bool(a.last_error), "agent saw the failure")
            assert "closed the connection before the SSH handshake" in a.last_error
            assert p.tunnels.connected() == [] and a.connects == 0

    run(main())


def test_no_client_certificate_is_refused_and_closed() -> None:
    cluster = Cluster()

    async def main() -> None:
        async with proxy(cluster) as p:
            host, port = p.addr.rsplit(":", 1)
            ctx = cluster.client_context(None)
            reader, writer = await asyncio.open_connection(
                host, int(port), ssl=ctx, server_hostname="localhost"
            )
            assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == TUNNEL_ALPN
            said = await reader.read()  # an SSH disconnect saying why, then the close
            assert said.startswith(b"SSH-2.0-") and b"no client certificate" in said
            writer.close()
            assert p.refused and "no client certificate" in p.refused[0][1]
            assert p.tunnels.connected() == []

    run(main())


def test_agent_refuses_a_server_that_is_not_a_proxy() -> None:
    cluster = Cluster()

    async def main() -> None:
        async with proxy(cluster, server_role="node") as p, agent(cluster, p.addr) as a:
            await until(lambda: "is not a Wardgate proxy" in a.last_error, "agent refused the server")
            assert a.connects == 0 and p.tunnels.connected() == []

    run(main())


# -- lifecycle ------------------------------------------------------------------------------


def test_agent_reconnects_after_proxy_restart_on_the_same_port(caplog: pytest.LogCaptureFixture) -> None:
    cluster = Cluster()
    caplog.set_level(logging.INFO, logger="wardgate.agent.tunnel")

    async def main() -> None:
        first = Proxy(cluster)
        addr = await first.start()
        port = int(addr.rsplit(":", 1)[1])
        async with agent(cluster, addr) as a:
            try:
                await asyncio.wait_for(a.connected.wait(), 10)
                assert await echo_round_trip(first, b"before") == b"before|ssh|"
            finally:
                await first.stop()
            await until(lambda: not a.connected.is_set(), "agent noticed the proxy went away")
            async with proxy(cluster, port=port) as second:
                await until(lambda: second.tunnels.connected() == ["host-1"], "agent came back")
                assert a.connects == 2
                assert await echo_round_trip(second, b"after") == b"after|ssh|"
        assert any("reconnecting to " + addr + " in " in r.getMessage() for r in caplog.records)

    run(main())


def test_newer_tunnel_from_the_same_host_replaces_the_older() -> None:
    cluster = Cluster()
    cert = cluster.agent_cert()

    async def main() -> None:
        async with proxy(cluster) as p, agent(cluster, p.addr, cert=cert) as a1:
            await asyncio.wait_for(a1.connected.wait(), 10)
            await until(lambda: p.tunnels.connected() == ["host-1"], "first tunnel")
            first = p.tunnels.get("host-1")
            assert first is not None
            async with agent(cluster, p.addr, cert=cert, backoff_base=5.0, backoff_max=5.0) as a2:
                await asyncio.wait_for(a2.connected.wait(), 10)
                await until(lambda: p.tunnels.get("host-1") is not first, "second tunnel registered")
                assert first.closed and p.tunnels.connected() == ["host-1"]
                await until(lambda: not a1.connected.is_set() or a1.connects > 1, "first agent was dropped")

    run(main())


def test_aborted_agent_connection_is_dropped_and_the_agent_comes_back() -> None:
    cluster = Cluster()

    async def main() -> None:
        async with (
            proxy(cluster, keepalive_interval=0.3, keepalive_count_max=2) as p,
            agent(cluster, p.addr) as a,
        ):
            await asyncio.wait_for(a.connected.wait(), 10)
            await until(lambda: p.tunnels.connected() == ["host-1"], "tunnel registered")
            first = p.tunnels.get("host-1")
            assert first is not None
            a.abort_transport()  # a TCP reset, no SSH or TLS goodbye
            await until(lambda: first.closed, "dead tunnel dropped")
            assert ("host-1", False) in p.changes
            await until(lambda: p.tunnels.connected() == ["host-1"] and a.connects == 2, "agent reconnected")

    run(main())


def test_silent_agent_is_dropped_by_keepalive() -> None:
    cluster = Cluster()

    async def main() -> None:
        async with (
            proxy(cluster, keepalive_interval=0.3, keepalive_count_max=2) as p,
            agent(cluster, p.addr, keepalive_interval=600) as a,
        ):
            await asyncio.wait_for(a.connected.wait(), 10)
            await until(lambda: p.tunnels.connected() == ["host-1"], "tunnel registered")
            assert a._transport is not None
            a._transport.pause_reading()  # the agent's host froze: TCP up, nothing answers
            await until(lambda: p.tunnels.connected() == [], "silent tunnel dropped")
            assert p.changes == [("host-1", True), ("host-1", False)]

    run(main())


def test_half_open_tunnel_does_not_block_others_and_is_dropped() -> None:
    cluster = Cluster()

    async def main() -> None:
        async with proxy(cluster, handshake_timeout=0.5) as p:
            host, port = p.addr.rsplit(":", 1)
            ctx = cluster.client_context(cluster.agent_cert("host-silent"))
            reader, writer = await asyncio.open_connection(
                host, int(port), ssl=ctx, server_hostname="localhost"
            )
            async with agent(cluster, p.addr) as a:
                await asyncio.wait_for(a.connected.wait(), 10)
                await until(lambda: p.tunnels.connected() == ["host-1"], "other agent registered")
                assert await echo_round_trip(p, b"meanwhile") == b"meanwhile|ssh|"
                seen = b""
                with contextlib.suppress(ConnectionError):
                    while data := await reader.read(65536):
                        seen += data
                assert seen.startswith(b"SSH-2.0-")  # the proxy spoke, waited, then hung up
                assert p.tunnels.connected() == ["host-1"]
            writer.close()

    run(main())
