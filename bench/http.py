"""HTTP app benchmark: `wrk` straight to an upstream, through nginx, and through Wardgate.

    .venv/bin/python bench/http.py                  # wrk -t2 -c64 -d30s per run
    .venv/bin/python bench/http.py --seconds 10     # quicker
    .venv/bin/python bench/http.py --format json

Everything is started here, on 127.0.0.1 in a temporary directory, and stopped at the end:

- the upstream: nginx (one worker) serving two static files, `small.txt` (SMALL_BYTES bytes) and
  `big.bin` (1 MiB);
- the peer: nginx (one worker) as a TLS-terminating reverse proxy to the upstream, HTTP/1.1
  keep-alive pool (`keepalive 64`), proxy buffering on (its defaults);
- a real all-in-one `wardgate start` (auth + proxy + app service, one process) publishing the
  upstream as app `bench` at https://localhost:PORT (the proxy itself is published as
  127.0.0.1, so the name `localhost` is the app's); a user with a role allowing the app signs in
  to the web API with password + TOTP and opens an app session the way the browser does (launch
  call, one-time token, state cookie); wrk then sends that app session cookie. Every request is
  authenticated, authorised, given a fresh `Wardgate-Jwt-Assertion` header (JWT cached per
  session) and audited (`app.session.request`).

Paths: `direct` (wrk → upstream, plain HTTP), `nginx` (wrk → nginx TLS → upstream),
`wardgate` (wrk → Wardgate TLS → app service → upstream). For each response size and path:
`wrk -t THREADS -c CONNECTIONS -d SECONDS --latency`; requests/s, p50/p99 latency, transfer
rate and CPU per process. Read the ratios (to nginx, the peer, and to direct) of the same run:
the two cores are shared by wrk, the upstream, the proxy under test and the audit log.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import ssh as sshbench  # bench/ssh.py's helpers, reused as they are
import stdlib_http  # noqa: F401 - before anything imports http: bench/http.py would shadow it

BIN = Path(sys.executable).parent
CLUSTER = "bench.example"
USER = "bench"
PASSWORD = "correct horse battery staple"
APP = "bench"
APP_HOST = "localhost"
SMALL_BYTES = 100
SIZES = {"small": "small.txt", "1MiB": "big.bin"}
PATHS = ("direct", "nginx", "wardgate")
ROLE = """kind: role
version: v1
metadata: {name: app-bench}
spec:
  allow:
    app_labels: {env: bench}
"""

progress = sshbench.progress
free_port = sshbench.free_port
port_open = sshbench.port_open
proc_cpu = sshbench.proc_cpu
machine_busy = sshbench.machine_busy
run = sshbench.run
Server = sshbench.Server


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process and its live children (nginx's work is done by its worker)."""
    total = proc_cpu(pid)
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            total += sum(tree_cpu(int(c)) for c in task.read_text().split())
    return total


def nginx_bin() -> str:
    found = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(found).exists():
        raise SystemExit("nginx is missing: apt-get install nginx-light (or run `make deps`)")
    return found


def wrk_bin() -> str:
    found = shutil.which("wrk")
    if found is None:
        raise SystemExit("wrk is missing: apt-get install wrk")
    return found


def nginx_conf(root: Path, port: int, body: str) -> Path:
    conf = root / "nginx.conf"
    conf.write_text(
        f"""worker_processes 1;
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
    keepalive_requests 1000000;
    {body.replace("PORT", str(port))}
}}
"""
    )
    return conf


@dataclass
class Bed:
    tmp: Path
    stack: contextlib.ExitStack
    upstream_port: int = 0
    nginx_port: int = 0
    proxy_port: int = 0
    auth_port: int = 0
    data_dir: Path = Path()
    pin: str = ""
    cookie: str = ""
    servers: dict[str, Any] = field(default_factory=dict)

    def serve(self, name: str, argv: list[str], ready_port: int) -> None:
        server = Server(name, argv, self.tmp / f"{name}.log")
        self.stack.callback(server.stop)
        server.wait_ready(lambda: port_open(ready_port), f"port {ready_port}")
        self.servers[name] = server

    def start_upstream(self) -> None:
        root = self.tmp / "upstream"
        (root / "www").mkdir(parents=True)
        (root / "www" / "small.txt").write_bytes(b"x" * (SMALL_BYTES - 1) + b"\n")
        (root / "www" / "big.bin").write_bytes(bytes(range(256)) * 4096)
        self.tmp.chmod(0o755)
        for p in (root, root / "www", *(root / "www").iterdir()):
            p.chmod(0o755 if p.is_dir() else 0o644)
        self.upstream_port = free_port()
        conf = nginx_conf(root, self.upstream_port, f"server {{ listen 127.0.0.1:PORT; root {root}/www; }}")
        progress(
            f"upstream: nginx serving small.txt ({SMALL_BYTES} B) and big.bin (1 MiB)"
            f" on :{self.upstream_port}"
        )
        self.serve(
            "upstream",
            [nginx_bin(), "-p", str(root), "-c", str(conf), "-g", "daemon off;"],
            self.upstream_port,
        )

    def start_nginx_proxy(self) -> None:
        root = self.tmp / "nginx-proxy"
        root.mkdir()
        run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", str(root / "key.pem"), "-out", str(root / "cert.pem"), "-subj", "/CN=localhost",
             "-days", "1"])  # fmt: skip
        self.nginx_port = free_port()
        body = f"""upstream up {{ server 127.0.0.1:{self.upstream_port}; keepalive 64; }}
    server {{
        listen 127.0.0.1:PORT ssl;
        ssl_certificate {root}/cert.pem; ssl_certificate_key {root}/key.pem;
        location / {{ proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection "";
                     proxy_set_header Host $host; proxy_set_header X-Forwarded-For $remote_addr; }}
    }}"""
        conf = nginx_conf(root, self.nginx_port, body)
        progress(f"peer: nginx TLS reverse proxy on :{self.nginx_port}")
        self.serve(
            "nginx", [nginx_bin(), "-p", str(root), "-c", str(conf), "-g", "daemon off;"], self.nginx_port
        )

    def wardctl(self, *args: str, stdin: str | None = None) -> str:
        return run([str(BIN / "wardctl"), "--data-dir", str(self.data_dir), *args], stdin=stdin)

    def start_wardgate(self) -> None:
        root = self.tmp / "wardgate"
        root.mkdir()
        self.data_dir = root / "data"
        self.auth_port, self.proxy_port = free_port(), free_port()
        config = root / "wardgate.yaml"
        config.write_text(
            f"""version: v1
wardgate:
  nodename: bench-app
  data_dir: {self.data_dir}
auth_service:
  listen_addr: 127.0.0.1:{self.auth_port}
  cluster_name: {CLUSTER}
proxy_service:
  listen_addr: 127.0.0.1:{self.proxy_port}
ssh_service:
  enabled: false
app_service:
  enabled: true
  apps:
    - name: {APP}
      uri: http://127.0.0.1:{self.upstream_port}
      public_addr: {APP_HOST}
      labels: {{env: bench}}
"""
        )
        progress(f"starting wardgate (auth :{self.auth_port}, proxy :{self.proxy_port}, app service)")
        self.serve("wardgate", [str(BIN / "wardgate"), "start", "-c", str(config)], self.proxy_port)
        deadline = time.monotonic() + 60
        while not (self.data_dir / "admin.identity").exists() or not port_open(self.auth_port):
            if time.monotonic() > deadline:
                raise RuntimeError(self.servers["wardgate"].output())
            time.sleep(0.1)
        self.pin = json.loads(self.wardctl("status", "--format", "json"))["ca_pin"]
        self.wardctl("create", "-f", "-", stdin=ROLE)
        progress(f"user {USER} (password + TOTP), web sign-in, app session for {APP}")
        secret = sshbench.register_user(self.wardctl, self.auth_port, self.pin, roles="app-bench")
        self.cookie = asyncio.run(self.app_session(secret))

    async def app_session(self, secret: str) -> str:
        """Sign in to the web API and open an app session the browser's way."""
        import aiohttp

        from wardgate.auth.totp import current_code

        base = f"https://127.0.0.1:{self.proxy_port}"
        jar = aiohttp.CookieJar(unsafe=True)
        connector = aiohttp.TCPConnector(ssl=False)
        async with aiohttp.ClientSession(connector=connector, cookie_jar=jar) as http:
            headers = {"Origin": base}
            body = {"user": USER, "password": PASSWORD, "otp": current_code(secret, time.time() + 30)}
            async with http.post(f"{base}/webapi/sessions/web", json=body, headers=headers) as r:
                r.raise_for_status()
                bearer = (await r.json())["token"]
            deadline = time.monotonic() + 30
            state = secrets.token_urlsafe(16)
            while True:
                async with http.post(
                    f"{base}/webapi/sessions/app",
                    json={"fqdn": APP_HOST, "state": state, "path": "/"},
                    headers={**headers, "Authorization": f"Bearer {bearer}"},
                ) as r:
                    if r.status == 201:
                        redirect = (await r.json())["redirect"]
                        break
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"no app session: {r.status} {await r.text()}")
                await asyncio.sleep(0.3)
            url = redirect.replace(
                f"https://{APP_HOST}:{self.proxy_port}", f"https://127.0.0.1:{self.proxy_port}"
            )
            async with http.get(
                url,
                headers={
                    "Host": f"{APP_HOST}:{self.proxy_port}",
                    "Cookie": f"__Host-wardgate_app_state={state}",
                },
                server_hostname=APP_HOST,
                allow_redirects=False,
            ) as r:
                if r.status != 302 or "__Host-wardgate_app" not in r.cookies:
                    raise RuntimeError(f"the app did not set its session cookie: {r.status} {await r.text()}")
                return str(r.cookies["__Host-wardgate_app"].value)


@dataclass
class Result:
    size: str
    path: str
    rps: float
    p50_ms: float
    p99_ms: float
    mb_per_s: float
    requests: int
    errors: int
    seconds: float
    cpu: dict[str, float] = field(default_factory=dict)


def parse_wrk(out: str) -> dict[str, float]:
    def num(pattern: str) -> float:
        m = re.search(pattern, out)
        return float(m.group(1)) if m else float("nan")

    def ms(pattern: str) -> float:
        m = re.search(pattern, out)
        if not m:
            return float("nan")
        value, unit = float(m.group(1)), m.group(2)
        return value * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]

    def rate(pattern: str) -> float:
        m = re.search(pattern, out)
        if not m:
            return float("nan")
        value, unit = float(m.group(1)), m.group(2)
        return value * {"B": 1 / 1e6, "KB": 1024 / 1e6, "MB": 1024**2 / 1e6, "GB": 1024**3 / 1e6}[unit]

    errors = sum(int(x) for x in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    non2xx = num(r"Non-2xx or 3xx responses: (\d+)")
    return {
        "rps": num(r"Requests/sec:\s+([\d.]+)"),
        "p50": ms(r"\s50%\s+([\d.]+)(us|ms|s|m)\b"),
        "p99": ms(r"\s99%\s+([\d.]+)(us|ms|s|m)\b"),
        "rate": rate(r"Transfer/sec:\s+([\d.]+)(B|KB|MB|GB)"),
        "requests": num(r"(\d+) requests in"),
        "errors": errors + (0 if non2xx != non2xx else int(non2xx)),
    }


class Bench:
    def __init__(self, bed: Bed, args: argparse.Namespace) -> None:
        self.bed = bed
        self.args = args

    def target(self, path: str, size: str) -> tuple[str, list[str]]:
        name = SIZES[size]
        b = self.bed
        if path == "direct":
            return f"http://127.0.0.1:{b.upstream_port}/{name}", []
        if path == "nginx":
            return f"https://localhost:{b.nginx_port}/{name}", []
        return f"https://{APP_HOST}:{b.proxy_port}/{name}", ["-H", f"Cookie: __Host-wardgate_app={b.cookie}"]

    def check(self) -> None:
        """Every path answers with the upstream's bytes before anything is measured."""
        for path in self.args.paths:
            for size in self.args.sizes:
                url, headers = self.target(path, size)
                out = subprocess.run(
                    ["curl", "-sk", "-o", "/dev/null", "-w", "%{http_code} %{size_download}", *headers, url],
                    capture_output=True, text=True, timeout=30,
                )  # fmt: skip
                want = f"200 {SMALL_BYTES if size == 'small' else 1 << 20}"
                if out.stdout != want:
                    raise RuntimeError(f"{path} {size}: got {out.stdout!r}, want {want!r}: {out.stderr}")

    def wrk(self, path: str, size: str) -> Result:
        a = self.args
        url, headers = self.target(path, size)
        argv = [wrk_bin(), "-t", str(a.threads), "-c", str(a.connections), "-d", f"{a.seconds}s", "--latency",
                *headers, url]  # fmt: skip
        pids = {name: s.pid for name, s in self.bed.servers.items()}
        before = {k: tree_cpu(p) for k, p in pids.items()}
        busy0, t0 = machine_busy(), time.monotonic()
        out = run(argv, timeout=a.seconds * 3 + 60)
        elapsed = time.monotonic() - t0
        cpu = {k: (tree_cpu(pids[k]) - v) / elapsed for k, v in before.items()}
        cpu["machine"] = (machine_busy() - busy0) / elapsed
        p = parse_wrk(out)
        return Result(size, path, p["rps"], p["p50"], p["p99"], p["rate"], int(p["requests"]),
                      int(p["errors"]), elapsed, cpu)  # fmt: skip

    def run(self) -> list[Result]:
        self.check()
        results = []
        for rnd in range(self.args.runs):
            for size in self.args.sizes:
                for path in self.args.paths:
                    progress(f"run {rnd + 1}/{self.args.runs}: {size:<5} {path:<8} ({self.args.seconds} s)")
                    r = self.wrk(path, size)
                    results.append(r)
                    progress(f"  {r.rps:,.0f} req/s  p99 {r.p99_ms:.2f} ms  errors {r.errors}")
        return results


def best(results: list[Result]) -> list[Result]:
    out: dict[tuple[str, str], Result] = {}
    for r in results:
        if (r.size, r.path) not in out or r.rps > out[(r.size, r.path)].rps:
            out[(r.size, r.path)] = r
    return list(out.values())


def report(results: list[Result], meta: dict[str, Any]) -> str:
    rows = best(results)
    by = {(r.size, r.path): r for r in rows}
    head = ["size", "path", "req/s", "x nginx", "x direct", "p50 ms", "p99 ms", "MB/s", "errors",
            "wardgate CPU", "nginx CPU", "upstream CPU", "machine CPU"]  # fmt: skip
    cells = [head]

    def x(r: Result, other: str) -> str:
        base = by.get((r.size, other))
        return f"{r.rps / base.rps:.2f}" if base and base.rps else "-"

    def cpu(r: Result, key: str) -> str:
        return f"{r.cpu[key]:.2f}" if r.cpu.get(key, 0) >= 0.005 else "-"

    for r in rows:
        cells.append([r.size, r.path, f"{r.rps:,.0f}", x(r, "nginx"), x(r, "direct"), f"{r.p50_ms:.2f}",
                      f"{r.p99_ms:.2f}", f"{r.mb_per_s:,.0f}", str(r.errors), cpu(r, "wardgate"),
                      cpu(r, "nginx"), cpu(r, "upstream"), f"{r.cpu['machine']:.2f}"])  # fmt: skip
    out = [
        f"wrk -t{meta['threads']} -c{meta['connections']} -d{meta['seconds']}s --latency,"
        f" best of {meta['runs']}; {meta['nginx']}, {meta['wrk']}, python {meta['python']},"
        f" {meta['cpus']} CPUs shared by everything,"
        f" {meta['when']}",
        "",
        *sshbench.render(cells, left=2),
        "",
        "x nginx / x direct: requests/s divided by the nginx (TLS reverse proxy, one worker) and direct",
        "rows of the same size. CPU: CPU seconds per second of run (1.00 = one core) of the wardgate",
        "process (proxy + app service + auth + audit log), the nginx proxy, the upstream nginx, and the",
        f"whole machine ({meta['cpus']} CPUs, wrk included).",
    ]
    if meta.get("audited") is not None:
        out.append(
            f"Audit: {meta['audited']:,} app.session.request events in the audit log after the runs"
            f" (wrk counted {meta['wardgate_requests']:,} completed requests through Wardgate; it does"
            " not count those cut off at the end)."
        )
    small = by.get(("small", "wardgate")), by.get(("small", "nginx"))
    big = by.get(("1MiB", "wardgate")), by.get(("1MiB", "nginx"))
    if all(small):
        ratio = small[0].rps / small[1].rps  # type: ignore[union-attr]
        out.append(
            f"Target small responses >= 0.70 x nginx: {'met' if ratio >= 0.7 else 'NOT met'} ({ratio:.2f}x)"
        )
    if all(big):
        ratio = big[0].rps / big[1].rps  # type: ignore[union-attr]
        out.append(
            f"Target 1 MiB responses >= 1.00 x nginx: {'met' if ratio >= 1.0 else 'NOT met'} ({ratio:.2f}x)"
        )
    return "\n".join(out)


def settled_audit_count(data_dir: Path) -> int | None:
    """`app.session.request` events once the emitter's batches have landed (the count is still)."""
    last, deadline = -1, time.monotonic() + 30
    while time.monotonic() < deadline:
        count = sshbench.audit_count(data_dir, "app.session.request")
        if count is None or count == last:
            return count
        last = count
        time.sleep(1.5)
    return last


def version(argv: list[str]) -> str:
    """First line a tool prints about itself (nginx and wrk print it on stderr, wrk exits 1)."""
    out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    line = (out.stdout + out.stderr).strip().splitlines()[0]
    return line.removeprefix("nginx version: ").split(" [")[0].split(" Copyright")[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=30, help="wrk -d per run (default 30)")
    ap.add_argument("--connections", type=int, default=64, help="wrk -c (default 64)")
    ap.add_argument("--threads", type=int, default=2, help="wrk -t (default 2)")
    ap.add_argument("--runs", type=int, default=1, help="repeat every run, the best counts (default 1)")
    ap.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated, from {','.join(SIZES)}")
    ap.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated, from {','.join(PATHS)}")
    ap.add_argument("--format", choices=["text", "json"], default="text", help="result format on stdout")
    ap.add_argument(
        "--keep", action="store_true", help="keep the temp dir (configs, logs) and print its path"
    )
    args = ap.parse_args()
    args.sizes = [s for s in args.sizes.split(",") if s]
    args.paths = [p for p in args.paths.split(",") if p]
    if bad := [s for s in args.sizes if s not in SIZES] + [p for p in args.paths if p not in PATHS]:
        ap.error(f"unknown size/path {', '.join(bad)}")
    if min(args.seconds, args.connections, args.threads, args.runs) < 1:
        ap.error("--seconds, --connections, --threads and --runs must be positive")
    wrk_bin()
    sshbench.become_subreaper()
    tmp = Path(tempfile.mkdtemp(prefix="wardgate-bench-http-"))
    with contextlib.ExitStack() as stack:
        if not args.keep:
            stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        bed = Bed(tmp, stack)
        bed.start_upstream()
        if "nginx" in args.paths:
            bed.start_nginx_proxy()
        if "wardgate" in args.paths:
            bed.start_wardgate()
        results = Bench(bed, args).run()
        meta = {
            "seconds": args.seconds,
            "connections": args.connections,
            "threads": args.threads,
            "runs": args.runs,
            "nginx": version([nginx_bin(), "-v"]),
            "wrk": version([wrk_bin(), "-v"]),
            "python": platform.python_version(),
            "cpus": len(os.sched_getaffinity(0)),
            "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "audited": settled_audit_count(bed.data_dir) if "wardgate" in args.paths else None,
            "wardgate_requests": sum(r.requests for r in results if r.path == "wardgate"),
        }
        if args.format == "json":
            print(json.dumps({"meta": meta, "results": [asdict(r) for r in results]}, indent=2))
        else:
            print(report(results, meta))
        if args.keep:
            progress(f"kept {tmp}")


if __name__ == "__main__":
    main()
