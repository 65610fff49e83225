"""Relay benchmark: bulk throughput, round-trip latency and proxy CPU, side by side in one run.

    .venv/bin/python bench/relay.py                 # 1 GiB bulk, 1000 echoes per path
    .venv/bin/python bench/relay.py --size 64M --rtts 200

Paths, all on 127.0.0.1:
  direct      client -> server (the baseline)
  relay       client -> Wardgate relay (BufferedProtocol on uvloop, plain -> plain) -> server
  splice      client -> os.splice relay (plain -> plain) -> server
  tls-router  TLS client -> Wardgate TLS router (ALPN routed) -> relay -> plain server

The proxy runs in its own process (on uvloop, with the glibc allocator settings DESIGN.md
measured, unless --no-malloc-tuning) so its CPU seconds are its own; the servers (blocking
sockets, a thread per connection) run in another process, the client in this one. The machine
is noisy: read the ratios to direct, not the absolutes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import stdlib_http  # noqa: F401 - before anything imports http: bench/http.py would shadow it

MiB = 1 << 20
GiB = 1 << 30
CHUNK = MiB
MALLOC_ENV = {
    # DESIGN.md "Data-plane facts": stops glibc from trimming and re-faulting the heap per buffer.
    "MALLOC_MMAP_THRESHOLD_": str(64 * MiB),
    "MALLOC_TRIM_THRESHOLD_": str(256 * MiB),
    "MALLOC_TOP_PAD_": str(64 * MiB),
}


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": MiB, "G": GiB}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


# -- target servers (threads, blocking sockets) -------------------------------------------------


def _serve(handle: Callable[[socket.socket], None]) -> tuple[int, Callable[[], None]]:
    lsock = socket.create_server(("127.0.0.1", 0), backlog=128)
    stopping = threading.Event()

    def accept_loop() -> None:
        while not stopping.is_set():
            try:
                conn, _ = lsock.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=_guarded, args=(handle, conn), daemon=True).start()

    threading.Thread(target=accept_loop, daemon=True).start()

    def stop() -> None:
        stopping.set()
        lsock.close()

    return lsock.getsockname()[1], stop


def _guarded(handle: Callable[[socket.socket], None], conn: socket.socket) -> None:
    with conn, contextlib.suppress(OSError):
        handle(conn)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("peer closed early")
        buf += chunk
    return bytes(buf)


def sink(conn: socket.socket) -> None:
    """Read an 8-byte length, then that many bytes; answer `ok` (no half-close needed: TLS)."""
    left = int.from_bytes(_recv_exact(conn, 8), "big")
    buf = memoryview(bytearray(CHUNK))
    while left:
        n = conn.recv_into(buf, min(left, CHUNK))
        if not n:
            raise ConnectionError("peer closed early")
        left -= n
    conn.sendall(b"ok")


def echo(conn: socket.socket) -> None:
    while data := conn.recv(65536):
        conn.sendall(data)


# -- the proxy process ----------------------------------------------------------------------------


def serve_targets() -> None:
    """Runs in a child: the sink and echo servers, off the client's GIL; exits on stdin EOF."""
    sink_port, stop_sink = _serve(sink)
    echo_port, stop_echo = _serve(echo)
    print(json.dumps({"sink": sink_port, "echo": echo_port}), flush=True)
    sys.stdin.read()
    stop_sink()
    stop_echo()


def serve_proxy(mode: str, sink_port: int, echo_port: int, cert: str | None, key: str | None) -> None:
    """Runs in the child: two listeners (to the sink and to the echo server), then a command loop
    on stdin (`rusage` prints CPU seconds used so far; EOF exits)."""
    import asyncio

    from wardgate.proxy.relay import splice_relay, start_forwarder
    from wardgate.proxy.router import TLSConnection, TLSRouter, server_context
    from wardgate.runtime import run

    async def main() -> None:
        loop = asyncio.get_running_loop()
        closers: list[Callable[[], object]] = []
        ports: dict[str, int] = {}
        targets = {"sink": sink_port, "echo": echo_port}
        tasks: set[asyncio.Task[None]] = set()
        if mode == "relay":
            for name, target in targets.items():
                srv = await start_forwarder("127.0.0.1", 0, "127.0.0.1", target, backlog=128)
                ports[name] = srv.sockets[0].getsockname()[1]
                closers.append(srv.close)
        elif mode == "splice":
            for name, target in targets.items():
                lsock = socket.create_server(("127.0.0.1", 0), backlog=128)
                lsock.setblocking(False)
                ports[name] = lsock.getsockname()[1]

                async def splice_one(client: socket.socket, target: int) -> None:
                    upstream = socket.socket()
                    upstream.setblocking(False)
                    await loop.sock_connect(upstream, ("127.0.0.1", target))
                    await splice_relay(client, upstream)

                async def acceptor(lsock: socket.socket, target: int) -> None:
                    while True:
                        client, _ = await loop.sock_accept(lsock)
                        task = loop.create_task(splice_one(client, target))
                        tasks.add(task)
                        task.add_done_callback(tasks.discard)

                tasks.add(loop.create_task(acceptor(lsock, target)))
        else:
            assert cert and key
            router = TLSRouter(server_context(Path(cert).read_text(), Path(key).read_text()))
            for name, target in targets.items():

                async def handler(conn: TLSConnection, target: int = target) -> None:
                    await conn.relay_to("127.0.0.1", target)

                router.add_route(f"bench-{name}", handler)
            _, port = await router.start("127.0.0.1", 0)
            ports = {"sink": port, "echo": port}
        print(json.dumps(ports), flush=True)
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            if line.strip() == "rusage":
                ru = resource.getrusage(resource.RUSAGE_SELF)
                print(json.dumps({"cpu": ru.ru_utime + ru.ru_stime, "maxrss_kib": ru.ru_maxrss}), flush=True)
        for close in closers:
            close()

    run(main())


@dataclass
class Child:
    proc: subprocess.Popen[str]
    ports: dict[str, int]

    def cpu(self) -> float:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write("rusage\n")
        self.proc.stdin.flush()
        return float(json.loads(self.proc.stdout.readline())["cpu"])


@contextlib.contextmanager
def child(argv: list[str], env: dict[str, str] | None = None) -> Iterator[Child]:
    """A helper process that prints its ports as one JSON line and lives until stdin closes."""
    proc = subprocess.Popen(
        [sys.executable, __file__, *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert proc.stdout
        yield Child(proc, json.loads(proc.stdout.readline()))
    finally:
        if proc.stdin:
            proc.stdin.close()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- the client -----------------------------------------------------------------------------------


@dataclass
class Result:
    path: str
    mib_s: float
    rtt_p50_us: float
    rtt_p99_us: float
    cpu_per_gib: float | None


def dial(port: int, tls: ssl.SSLContext | None, alpn: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if tls is None:
        return sock
    tls_sock = tls.wrap_socket(sock, server_hostname="localhost")
    if tls_sock.selected_alpn_protocol() != alpn:
        raise RuntimeError(f"router chose ALPN {tls_sock.selected_alpn_protocol()!r}, wanted {alpn!r}")
    return tls_sock


def bulk(port: int, size: int, tls: ssl.SSLContext | None) -> float:
    """Seconds to push `size` bytes into the sink and hear back that all arrived."""
    if tls is not None:
        tls.set_alpn_protocols(["bench-sink"])
    block = memoryview(os.urandom(CHUNK))
    with dial(port, tls, "bench-sink") as sock:
        start = time.perf_counter()
        sock.sendall(size.to_bytes(8, "big"))
        left = size
        while left:
            n = min(left, CHUNK)
            sock.sendall(block[:n])
            left -= n
        if _recv_exact(sock, 2) != b"ok":
            raise RuntimeError("sink did not confirm")
        return time.perf_counter() - start


def round_trips(port: int, count: int, tls: ssl.SSLContext | None) -> list[float]:
    if tls is not None:
        tls.set_alpn_protocols(["bench-echo"])
    msg = os.urandom(64)
    times: list[float] = []
    with dial(port, tls, "bench-echo") as sock:
        for _ in range(20):  # warm up
            sock.sendall(msg)
            _recv_exact(sock, len(msg))
        for _ in range(count):
            t = time.perf_counter()
            sock.sendall(msg)
            _recv_exact(sock, len(msg))
            times.append(time.perf_counter() - t)
    return times


def measure(path: str, port_sink: int, port_echo: int, args: argparse.Namespace, tls: ssl.SSLContext | None,
            cpu: Callable[[], float] | None) -> Result:  # fmt: skip
    best = None
    cpu_used = None
    for _ in range(args.runs):
        before = cpu() if cpu else 0.0
        secs = bulk(port_sink, args.size, tls)
        used = (cpu() - before) if cpu else None
        if best is None or secs < best:
            best, cpu_used = secs, used
    assert best is not None
    rtts = sorted(round_trips(port_echo, args.rtts, tls))
    return Result(
        path,
        args.size / MiB / best,
        statistics.median(rtts) * 1e6,
        rtts[min(len(rtts) - 1, int(len(rtts) * 0.99))] * 1e6,
        None if cpu_used is None else cpu_used / (args.size / GiB),
    )


def make_cert(directory: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


def table(results: list[Result], args: argparse.Namespace) -> str:
    base = results[0]
    head = (
        f"{'path':<12} {'MiB/s':>8} {'x direct':>8}   {'RTT p50 us':>10} {'p99 us':>8} {'x direct':>8}"
        f"   {'proxy CPU-s/GiB':>15}"
    )
    lines = [
        f"bulk {args.size / MiB:.0f} MiB (best of {args.runs}), {args.rtts} x 64-byte echoes,"
        " one connection each",
        head,
        "-" * len(head),
    ]
    for r in results:
        cpu = "-" if r.cpu_per_gib is None else f"{r.cpu_per_gib:.2f}"
        lines.append(
            f"{r.path:<12} {r.mib_s:>8.0f} {r.mib_s / base.mib_s:>8.2f}"
            f"   {r.rtt_p50_us:>10.0f} {r.rtt_p99_us:>8.0f}"
            f" {r.rtt_p50_us / base.rtt_p50_us:>8.2f}   {cpu:>15}"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=parse_size, default=GiB, help="bulk bytes per path (e.g. 64M, 1G)")
    ap.add_argument("--rtts", type=int, default=1000, help="small echoes per path")
    ap.add_argument("--runs", type=int, default=1, help="bulk runs per path; the best counts")
    ap.add_argument("--paths", default="direct,relay,splice,tls-router")
    ap.add_argument("--no-malloc-tuning", action="store_true", help="run the proxy with glibc defaults")
    ap.add_argument("--serve", choices=["relay", "splice", "tls", "targets"], help=argparse.SUPPRESS)
    ap.add_argument("--sink-port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--echo-port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--cert", help=argparse.SUPPRESS)
    ap.add_argument("--key", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve == "targets":
        serve_targets()
        return
    if args.serve:
        serve_proxy(args.serve, args.sink_port, args.echo_port, args.cert, args.key)
        return

    results: list[Result] = []
    proxy_env = {**os.environ, **({} if args.no_malloc_tuning else MALLOC_ENV)}
    with (
        tempfile.TemporaryDirectory(prefix="wardgate-bench-") as tmp,
        child(["--serve", "targets"]) as targets,
    ):
        cert, key = make_cert(Path(tmp))
        client_tls = ssl.create_default_context(cafile=str(cert))
        sink_port, echo_port = targets.ports["sink"], targets.ports["echo"]
        for path in args.paths.split(","):
            print(f"... {path}", file=sys.stderr, flush=True)
            if path == "direct":
                results.append(measure(path, sink_port, echo_port, args, None, None))
                continue
            mode = {"relay": "relay", "splice": "splice", "tls-router": "tls"}[path]
            argv = ["--serve", mode, "--sink-port", str(sink_port), "--echo-port", str(echo_port)]
            with child([*argv, "--cert", str(cert), "--key", str(key)], env=proxy_env) as p:
                tls = client_tls if mode == "tls" else None
                results.append(measure(path, p.ports["sink"], p.ports["echo"], args, tls, p.cpu))
    tuning = "glibc defaults" if args.no_malloc_tuning else "malloc tuning on"
    when = time.strftime("%Y-%m-%d %H:%M")
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, proxy {tuning}, {when}")
    print(table(results, args))


if __name__ == "__main__":
    main()
