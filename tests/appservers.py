"""Throw-away upstreams for app-access tests and benchmarks: our aiohttp app, nginx, Redis.

Each listens on a free 127.0.0.1 port from a fresh directory and is stopped by its owner.
nginx serves static files (and, for benchmarks, can reverse-proxy); it runs in the foreground
(`daemon off`) so the PID we hold is the master's.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.cluster import free_port, wait_port

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


def have_nginx() -> bool:
    return Path(NGINX).exists()


def have_redis() -> bool:
    return shutil.which("redis-server") is not None and shutil.which("redis-cli") is not None


class Server:
    """A child process on a port, with its log kept for failure messages."""

    def __init__(self, argv: list[str], port: int, root: Path, name: str) -> None:
        self.port, self.root = port, root
        self.log = root / f"{name}.log"
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=root)
        if not wait_port(port, time.monotonic() + 20):
            self.stop()
            raise AssertionError(f"{name} did not start:\n{self.log.read_text()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)


def upstream_app(port: int = 0) -> Server:
    """tests/upstream_app.py: whoami, redirects, uploads, 1 MiB, streaming, WebSocket echo."""
    port = port or free_port()
    root = Path(tempfile.mkdtemp(prefix="wardgate-upstream-"))
    script = Path(__file__).with_name("upstream_app.py")
    return Server([sys.executable, str(script), str(port)], port, root, "upstream")


def nginx(
    files: dict[str, bytes],
    *,
    port: int = 0,
    proxy_to: str = "",
    ssl: tuple[Path, Path] | None = None,
    workers: int = 1,
) -> Server:
    """nginx serving `files` (name → bytes) from a fresh root, or reverse-proxying to
    `proxy_to` (host:port, keep-alive upstream) when given; TLS with `ssl` (cert, key)."""
    port = port or free_port()
    root = Path(tempfile.mkdtemp(prefix="wardgate-nginx-"))
    os.chmod(root, 0o755)  # noqa: S103 - the workers (user nobody when we are root) read the files
    www = root / "www"
    www.mkdir(mode=0o755)
    for name, data in files.items():
        (www / name).write_bytes(data)
        os.chmod(www / name, 0o644)
    listen = f"127.0.0.1:{port}" + (" ssl" if ssl else "")
    tls = f"ssl_certificate {ssl[0]}; ssl_certificate_key {ssl[1]};" if ssl else ""
    if proxy_to:
        location = """location / { proxy_pass http://up; proxy_http_version 1.1;
            proxy_set_header Connection ""; proxy_set_header Host $host; proxy_buffering on; }"""
        upstream = f"upstream up {{ server {proxy_to}; keepalive 64; }}"
    else:
        location = f"location / {{ root {www}; }}"
        upstream = ""
    (root / "nginx.conf").write_text(
        f"""worker_processes {workers};
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {root}/body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    default_type application/octet-stream;
    sendfile on;
    keepalive_requests 100000;
    {upstream}
    server {{ listen {listen}; server_name _; {tls} {location} }}
}}
"""
    )
    return Server(
        [NGINX, "-p", str(root), "-c", str(root / "nginx.conf"), "-g", "daemon off;"], port, root, "nginx"
    )


def redis(port: int = 0) -> Server:
    port = port or free_port()
    root = Path(tempfile.mkdtemp(prefix="wardgate-redis-"))
    argv = [
        "redis-server",
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(root),
    ]
    return Server(argv, port, root, "redis")
