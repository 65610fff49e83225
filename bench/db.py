"""Database benchmark: `pgbench` straight to PostgreSQL, through pgbouncer, and through Wardgate.

    .venv/bin/python bench/db.py                    # -c 8 -j 2 -T 60 per run, scale 10
    .venv/bin/python bench/db.py --seconds 15       # quicker
    .venv/bin/python bench/db.py --format json

Everything is started here, on 127.0.0.1 in a temporary directory, and stopped at the end (also
on Ctrl-C or failure):

- a real all-in-one `wardgate start` (auth + proxy + db service, one process) whose db service
  fronts database `pg-bench`;
- a throw-away PostgreSQL tuned for benchmarking (fsync, synchronous_commit and full_page_writes
  off) with TLS from a server certificate of the cluster's db CA (`wardctl auth sign
  --format=db`); pg_hba trusts loopback TCP for the bench user, so every path logs in the same
  way (Wardgate still presents its db-CA client certificate in the TLS handshake);
- pgbouncer (Debian package `pgbouncer`, installed with apt-get when missing) in session pool
  mode, `auth_type = trust`, TLS to the server;
- a user with a role that allows db user `bench` on db `bench`, registered with password + TOTP,
  then the real `ward login`, `ward db login pg-bench` and `ward proxy db pg-bench --tunnel`.

`pgbench -i -s SCALE` runs once, then for each mode and path `pgbench -n -c C -j J -T SECONDS`:

  select-only  `pgbench -S`: one SELECT by primary key per transaction (simple query protocol)
  tpc-b        pgbench's default TPC-B-like transaction (5 statements; BEGIN ... END)
  set-up       `pgbench -S -C -c 1 -j 1`: a new connection (and PostgreSQL backend) for every
               transaction, one after another; pgbench's average connection time

Paths (`--paths`):

  direct       pgbench -> PostgreSQL, TLS (sslmode=require), no proxy
  pgbouncer    pgbench -> pgbouncer (plain, loopback) -> PostgreSQL (TLS), session pooling
  wardgate     pgbench -> `ward proxy db --tunnel` (plain, loopback) -> TLS with the user's
               certificate -> Wardgate proxy + db service -> PostgreSQL (TLS, db-CA client cert);
               every statement audited (`db.session.query`)
  direct-plain pgbench -> PostgreSQL without TLS (reference row; not run by default)

Audit is on for the Wardgate path as shipped: each statement is one `db.session.query` event,
batched by the db service's emitter to the auth service, which writes them to its SQLite audit
log; the report counts what reached the log. The machine is shared by pgbench, PostgreSQL,
pgbouncer, `ward` and `wardgate`, and is noisy: read the ratios to `direct` in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import ssh as sshbench  # bench/ssh.py's helpers, reused as they are
import stdlib_http  # noqa: F401 - before anything imports http: bench/http.py would shadow it

BIN = Path(sys.executable).parent
PG_BIN = next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)), Path("/usr/bin"))
CLUSTER = "bench.example"
USER = "bench"
PASSWORD = "correct horse battery staple"
DB = "pg-bench"
DB_USER = DB_NAME = "bench"
DEFAULT_PATHS = ("direct", "pgbouncer", "wardgate")
ALL_PATHS = (*DEFAULT_PATHS, "direct-plain")
MODES = ("select-only", "tpc-b")
ROLE = f"""kind: role
version: v1
metadata: {{name: db-bench}}
spec:
  allow:
    db_labels: {{env: bench}}
    db_users: [{DB_USER}]
    db_names: [{DB_NAME}]
"""


# Shared with the SSH benchmark: processes, ports, CPU accounting, progress lines.
progress = sshbench.progress
free_port = sshbench.free_port
port_open = sshbench.port_open
proc_cpu = sshbench.proc_cpu
machine_busy = sshbench.machine_busy
run = sshbench.run
Server = sshbench.Server


def as_postgres(argv: list[str], *, timeout: float = 120) -> str:
    """PostgreSQL and pgbouncer refuse to run as root: run as the `postgres` system user."""
    if os.geteuid() == 0:
        argv = ["runuser", "-u", "postgres", "--", *argv]
    return run(argv, timeout=timeout)


def ensure_pgbouncer() -> str:
    found = shutil.which("pgbouncer") or (
        "/usr/sbin/pgbouncer" if Path("/usr/sbin/pgbouncer").exists() else ""
    )
    if found:
        return found
    progress("pgbouncer is not installed: installing the Debian package `pgbouncer` with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    proc = subprocess.run(["apt-get", "install", "-y", "pgbouncer"], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        subprocess.run(["apt-get", "update"], capture_output=True, env=env)
        run(["apt-get", "install", "-y", "pgbouncer"], timeout=600, env=env)
    return shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"


# -- the test bed --------------------------------------------------------------------------------


@dataclass
class Bed:
    tmp: Path
    stack: contextlib.ExitStack
    wardgate: Server | None = None
    tunnel: Server | None = None
    bouncer: Server | None = None
    data_dir: Path = Path()
    pg_root: Path = Path()
    auth_port: int = 0
    proxy_port: int = 0
    pg_port: int = 0
    bouncer_port: int = 0
    tunnel_port: int = 0
    pin: str = ""
    home: Path = Path()

    def wardctl(self, *args: str) -> str:
        return run([str(BIN / "wardctl"), "--data-dir", str(self.data_dir), *args])

    def ward_env(self) -> dict[str, str]:
        return {**os.environ, "WARD_HOME": str(self.home), "COLUMNS": "200"}

    def ward(self, *args: str) -> str:
        return run([str(BIN / "ward"), *args], env=self.ward_env())

    def start_wardgate(self) -> None:
        self.data_dir = self.tmp / "wardgate" / "data"
        self.auth_port, self.proxy_port, self.pg_port = free_port(), free_port(), free_port()
        config = self.tmp / "wardgate" / "wardgate.yaml"
        config.parent.mkdir(parents=True)
        config.write_text(
            f"""version: v1
wardgate:
  nodename: bench-db
  data_dir: {self.data_dir}
auth_service:
  listen_addr: 127.0.0.1:{self.auth_port}
  cluster_name: {CLUSTER}
proxy_service:
  listen_addr: 127.0.0.1:{self.proxy_port}
ssh_service:
  enabled: false
db_service:
  enabled: true
  databases:
    - name: {DB}
      protocol: postgres
      uri: 127.0.0.1:{self.pg_port}
      labels: {{env: bench}}
      tls: {{mode: verify-full, server_name: localhost}}
"""
        )
        progress(f"starting wardgate (auth :{self.auth_port}, proxy :{self.proxy_port}, db service)")
        self.wardgate = Server(
            "wardgate", [str(BIN / "wardgate"), "start", "-c", str(config)], config.parent / "wardgate.log"
        )
        self.stack.callback(self.wardgate.stop)
        self.wardgate.wait_ready(
            lambda: (
                "Press Ctrl-C to stop." in self.wardgate.output()  # type: ignore[union-attr]
                and (self.data_dir / "admin.identity").exists()
                and port_open(self.auth_port)
                and port_open(self.proxy_port)
            ),
            "readiness",
        )
        self.pin = json.loads(self.wardctl("status", "--format", "json"))["ca_pin"]

    def start_postgres(self, scale: int) -> None:
        self.pg_root = self.tmp / "pg"
        self.pg_root.mkdir()
        os.chmod(self.tmp, 0o755)
        os.chmod(self.pg_root, 0o755)
        self.wardctl(
            "auth", "sign", "--format=db", "--host=localhost,127.0.0.1", f"--out={self.pg_root / 'server'}"
        )
        data = self.pg_root / "data"
        for p in [self.pg_root, *self.pg_root.iterdir()]:
            shutil.chown(p, "postgres", "postgres")
        os.chmod(self.pg_root / "server.key", 0o600)
        progress(f"initdb + starting PostgreSQL ({PG_BIN.parent.name}) on :{self.pg_port}")
        as_postgres([str(PG_BIN / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync"])
        with open(data / "postgresql.conf", "a") as f:
            f.write(
                f"listen_addresses = '127.0.0.1'\nport = {self.pg_port}\n"
                f"unix_socket_directories = '{self.pg_root}'\nmax_connections = 200\n"
                "shared_buffers = 512MB\nfsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
                "max_wal_size = 4GB\ncheckpoint_timeout = 30min\n"
                f"ssl = on\nssl_cert_file = '{self.pg_root}/server.crt'\n"
                f"ssl_key_file = '{self.pg_root}/server.key'\nssl_ca_file = '{self.pg_root}/server.cas'\n"
            )
        (data / "pg_hba.conf").write_text(f"local all all trust\nhost all {DB_USER} 127.0.0.1/32 trust\n")
        pg_ctl = [str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(self.pg_root / "postgres.log"), "-w"]
        as_postgres([*pg_ctl, "start"])
        self.stack.callback(lambda: as_postgres([*pg_ctl, "-m", "immediate", "stop"]))
        self.psql_admin(f"CREATE ROLE {DB_USER} LOGIN")
        self.psql_admin(f"CREATE DATABASE {DB_NAME} OWNER {DB_USER}")
        progress(f"pgbench -i -s {scale}")
        env = {**os.environ, "PGSSLMODE": "disable"}
        run(
            [
                "pgbench",
                "-i",
                "-q",
                "-s",
                str(scale),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.pg_port),
                "-U",
                DB_USER,
                DB_NAME,
            ],
            timeout=1800,
            env=env,
        )

    def psql_admin(self, sql: str) -> str:
        return as_postgres(
            ["psql", "-h", str(self.pg_root), "-p", str(self.pg_port), "-U", "postgres", "-d", "postgres",
             "-v", "ON_ERROR_STOP=1", "-Atc", sql]
        )  # fmt: skip

    def start_pgbouncer(self) -> None:
        exe = ensure_pgbouncer()
        root = self.tmp / "pgbouncer"
        root.mkdir()
        self.bouncer_port = free_port()
        (root / "users.txt").write_text(f'"{DB_USER}" ""\n')
        ini = root / "pgbouncer.ini"
        ini.write_text(
            f"""[databases]
{DB_NAME} = host=127.0.0.1 port={self.pg_port} dbname={DB_NAME}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {self.bouncer_port}
unix_socket_dir =
auth_type = trust
auth_file = {root / "users.txt"}
pool_mode = session
max_client_conn = 500
default_pool_size = 50
server_tls_sslmode = require
pidfile = {root / "pgbouncer.pid"}
logfile = {root / "pgbouncer.log"}
log_connections = 0
log_disconnections = 0
"""
        )
        for p in [root, *root.iterdir()]:
            shutil.chown(p, "postgres", "postgres")
        argv = [exe, str(ini)]
        if os.geteuid() == 0:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        progress(f"starting pgbouncer (session pooling) on :{self.bouncer_port}")
        self.bouncer = Server("pgbouncer", argv, root / "stdout.log")
        self.stack.callback(self.bouncer.stop)
        self.bouncer.wait_ready(lambda: port_open(self.bouncer_port), "listening port")

    def bouncer_pid(self) -> int:
        with contextlib.suppress(OSError, ValueError):
            return int((self.tmp / "pgbouncer" / "pgbouncer.pid").read_text().strip())
        return 0

    def add_user_and_login(self) -> None:
        progress(f"role db-bench, user {USER} (password + TOTP), `ward login`, `ward db login {DB}`")
        role = self.tmp / "role.yaml"
        role.write_text(ROLE)
        self.wardctl("create", "-f", str(role))
        secret = sshbench.register_user(self.wardctl, self.auth_port, self.pin, roles="db-bench")
        self.home = self.tmp / "ward-home"
        # The next step: registration spent this one.
        sshbench.ward_login(
            self.home, self.proxy_port, self.pin, sshbench.current_totp(secret, time.time() + 30)
        )
        deadline = time.monotonic() + 30
        while DB not in self.ward("db", "ls"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{DB} never showed up in `ward db ls`")
            time.sleep(0.3)
        self.ward("db", "login", DB, f"--db-user={DB_USER}", f"--db-name={DB_NAME}")
        self.tunnel_port = free_port()
        progress(f"starting `ward proxy db {DB} --tunnel` on :{self.tunnel_port}")
        self.tunnel = Server(
            "ward proxy db",
            [str(BIN / "ward"), "proxy", "db", DB, "--tunnel", f"--port={self.tunnel_port}"],
            self.tmp / "ward-proxy-db.log",
            {"WARD_HOME": str(self.home)},
        )
        self.stack.callback(self.tunnel.stop)
        self.tunnel.wait_ready(lambda: port_open(self.tunnel_port), "listening port")

    def target(self, path: str) -> tuple[int, str]:
        """(port, sslmode) pgbench uses for `path`."""
        return {
            "direct": (self.pg_port, "require"),
            "direct-plain": (self.pg_port, "disable"),
            "pgbouncer": (self.bouncer_port, "disable"),
            "wardgate": (self.tunnel_port, "disable"),
        }[path]

    def audit_count(self, event: str) -> int | None:
        return sshbench.audit_count(self.data_dir, event)


# -- runs ------------------------------------------------------------------------------------------


@dataclass
class Run:
    mode: str
    path: str
    tps: float
    latency_ms: float
    transactions: int
    failed: int
    conn_ms: float
    """pgbench's initial connection time (average connection time for set-up runs)."""
    seconds: float
    cpu: dict[str, float] = field(default_factory=dict)
    """CPU seconds per second of run, by process (wardgate, ward tunnel, pgbouncer) and machine."""


def parse_pgbench(out: str) -> dict[str, float]:
    def num(pattern: str) -> float:
        m = re.search(pattern, out)
        return float(m.group(1)) if m else float("nan")

    return {
        "tps": num(r"tps = ([\d.]+)"),
        "latency": num(r"latency average = ([\d.]+) ms"),
        "transactions": num(r"number of transactions actually processed: (\d+)"),
        "failed": num(r"number of failed transactions: (\d+)"),
        "conn": num(r"(?:initial|average) connection time = ([\d.]+) ms"),
    }


class Bench:
    def __init__(self, bed: Bed, args: argparse.Namespace) -> None:
        self.bed = bed
        self.args = args

    def pgbench(self, path: str, mode: str, extra: list[str], seconds: int) -> Run:
        port, sslmode = self.bed.target(path)
        argv = [
            "pgbench",
            "-n",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-U",
            DB_USER,
            *extra,
            "-T",
            str(seconds),
        ]
        env = {**os.environ, "PGSSLMODE": sslmode, "PGAPPNAME": f"bench-{path}"}
        pids = {
            "wardgate": self.bed.wardgate.pid if self.bed.wardgate else 0,
            "ward tunnel": self.bed.tunnel.pid if self.bed.tunnel else 0,
            "pgbouncer": self.bed.bouncer_pid(),
        }
        before = {k: proc_cpu(p) for k, p in pids.items() if p}
        busy0, t0 = machine_busy(), time.monotonic()
        out = run([*argv, DB_NAME], timeout=seconds * 3 + 120, env=env)
        elapsed = time.monotonic() - t0
        cpu = {k: (proc_cpu(pids[k]) - v) / elapsed for k, v in before.items()}
        cpu["machine"] = (machine_busy() - busy0) / elapsed
        p = parse_pgbench(out)
        return Run(
            mode, path, p["tps"], p["latency"], int(p["transactions"]),
            int(p["failed"]) if p["failed"] == p["failed"] else 0, p["conn"], elapsed, cpu,
        )  # fmt: skip

    def check_paths(self, paths: list[str]) -> None:
        for path in paths:
            port, sslmode = self.bed.target(path)
            env = {**os.environ, "PGSSLMODE": sslmode}
            out = run(["psql", "-h", "127.0.0.1", "-p", str(port), "-U", DB_USER, "-d", DB_NAME, "-Atc",
                       "select count(*) from pgbench_branches"], env=env)  # fmt: skip
            if out.strip() != str(self.args.scale):
                raise RuntimeError(f"{path}: unexpected answer {out!r}")

    def run(self, paths: list[str]) -> list[Run]:
        a = self.args
        self.check_paths(paths)
        results: list[Run] = []
        load = ["-c", str(a.clients), "-j", str(a.threads)]
        for rnd in range(a.runs):
            for mode in a.modes:
                extra = [*load, "-S"] if mode == "select-only" else load
                for path in paths:
                    progress(f"run {rnd + 1}/{a.runs}: {mode:<11} {path:<12} ({a.seconds} s)")
                    r = self.pgbench(path, mode, extra, a.seconds)
                    results.append(r)
                    progress(f"  tps {r.tps:,.0f}  latency {r.latency_ms:.3f} ms")
            if a.setup_seconds:
                for path in paths:
                    progress(f"run {rnd + 1}/{a.runs}: set-up      {path:<12} ({a.setup_seconds} s)")
                    r = self.pgbench(path, "set-up", ["-S", "-C", "-c", "1", "-j", "1"], a.setup_seconds)
                    results.append(r)
                    progress(f"  connections/s {r.tps:,.0f}  average connection time {r.conn_ms:.2f} ms")
        return results


# -- report --------------------------------------------------------------------------------------


def best(results: list[Run]) -> list[Run]:
    """Per (mode, path), the run with the highest TPS (runs repeat with --runs)."""
    out: dict[tuple[str, str], Run] = {}
    for r in results:
        key = (r.mode, r.path)
        if key not in out or r.tps > out[key].tps:
            out[key] = r
    return list(out.values())


def ratios(results: list[Run]) -> dict[str, dict[str, float]]:
    """TPS of each (mode, path) divided by the direct path's in the same mode."""
    out: dict[str, dict[str, float]] = {}
    base = {r.mode: r for r in results if r.path == "direct"}
    for r in results:
        if r.mode in base and base[r.mode].tps:
            out.setdefault(r.mode, {})[r.path] = r.tps / base[r.mode].tps
    return out


def render(cells: list[list[str]], left: int = 2) -> list[str]:
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = [
        "  ".join(
            c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def report(results: list[Run], meta: dict[str, Any]) -> str:
    rows = best(results)
    rs = ratios(rows)
    head = ["mode", "path", "TPS", "x direct", "latency ms", "conn ms", "wardgate CPU", "ward CPU",
            "pgbouncer CPU", "machine CPU"]  # fmt: skip
    cells = [head]

    def cpu(r: Run, key: str) -> str:
        return f"{r.cpu[key]:.2f}" if r.cpu.get(key, 0) >= 0.005 else "-"

    for r in rows:
        x = rs.get(r.mode, {}).get(r.path)
        cells.append(
            [
                r.mode,
                r.path,
                f"{r.tps:,.0f}",
                f"{x:.2f}" if x is not None else "-",
                f"{r.latency_ms:.3f}",
                f"{r.conn_ms:.2f}",
                cpu(r, "wardgate"),
                cpu(r, "ward tunnel"),
                cpu(r, "pgbouncer"),
                f"{r.cpu['machine']:.2f}",
            ]
        )
    out = [
        f"pgbench scale {meta['scale']}, -c {meta['clients']} -j {meta['threads']} -T {meta['seconds']}"
        f" (set-up: -S -C -c 1 -j 1 -T {meta['setup_seconds']}), best of {meta['runs']};"
        f" {meta['postgres']}, {meta['pgbouncer']}, python {meta['python']},"
        f" {meta['cpus']} CPUs shared by everything, {meta['when']}",
        "",
        *render(cells),
        "",
        "x direct: TPS divided by the direct row's (same mode). conn ms: pgbench's initial connection time",
        "(set-up rows: average connection time, one connection per transaction). CPU columns: CPU",
        "seconds per second of run (1.00 = one core busy) of the wardgate process (proxy + db service +",
        "auth + audit log), `ward proxy db --tunnel`, pgbouncer, and the whole machine"
        f" ({meta['cpus']} CPUs).",
    ]
    if meta.get("audited") is not None:
        out.append(
            f"Audit: {meta['audited']:,} db.session.query events in the audit log after the runs"
            f" (the Wardgate runs processed {meta['wardgate_statements']:,} statements)."
        )
    target = rs.get("select-only", {}).get("wardgate")
    if target is not None:
        verdict = "met" if target >= 0.8 else "NOT met"
        out.append(
            f"Target (select-only TPS through Wardgate >= 0.80 x direct, audit on): {verdict} ({target:.2f}x)"
        )
    return "\n".join(out)


# -- main ------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=60, help="pgbench -T per run (default 60)")
    ap.add_argument("--clients", type=int, default=8, help="pgbench -c (default 8)")
    ap.add_argument("--threads", type=int, default=2, help="pgbench -j (default 2)")
    ap.add_argument("--scale", type=int, default=10, help="pgbench -i -s (default 10)")
    ap.add_argument("--runs", type=int, default=1, help="repeat every run, the best counts (default 1)")
    ap.add_argument(
        "--setup-seconds",
        type=int,
        default=None,
        help="-T of the set-up runs (default: a third of --seconds; 0 skips)",
    )
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {','.join(MODES)}")
    ap.add_argument(
        "--paths",
        default=",".join(DEFAULT_PATHS),
        help=f"comma-separated, from {','.join(ALL_PATHS)} (default {','.join(DEFAULT_PATHS)})",
    )
    ap.add_argument("--format", choices=["text", "json"], default="text", help="result format on stdout")
    ap.add_argument(
        "--keep", action="store_true", help="keep the temp dir (configs, logs) and print its path"
    )
    args = ap.parse_args()
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    if bad := [p for p in paths if p not in ALL_PATHS]:
        ap.error(f"unknown path(s) {', '.join(bad)}; choose from {', '.join(ALL_PATHS)}")
    if bad := [m for m in args.modes if m not in MODES]:
        ap.error(f"unknown mode(s) {', '.join(bad)}; choose from {', '.join(MODES)}")
    if args.setup_seconds is None:
        args.setup_seconds = max(5, args.seconds // 3)
    if min(args.seconds, args.clients, args.threads, args.scale, args.runs) < 1 or args.setup_seconds < 0:
        ap.error("--seconds, --clients, --threads, --scale and --runs must be positive")
    for tool in ("pgbench", "psql"):
        if shutil.which(tool) is None:
            ap.error(f"{tool} is not installed (Debian: postgresql-client)")
    if not (PG_BIN / "initdb").exists():
        ap.error("PostgreSQL's server (initdb, pg_ctl) is not installed (Debian: postgresql)")

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    tmp = Path(tempfile.mkdtemp(prefix="wardgate-bench-db-"))
    results: list[Run] = []
    audited: int | None = None
    try:
        with contextlib.ExitStack() as stack:
            bed = Bed(tmp, stack)
            bed.start_wardgate()
            bed.start_postgres(args.scale)
            if "pgbouncer" in paths:
                bed.start_pgbouncer()
            bed.add_user_and_login()
            results = Bench(bed, args).run(paths)
            if "wardgate" in paths:
                time.sleep(3)  # the emitter ships in batches
                audited = bed.audit_count("db.session.query")
            progress("stopping")
    except KeyboardInterrupt:
        progress("interrupted: everything started has been stopped")
        sys.exit(130)
    finally:
        if args.keep:
            progress(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    bouncer = subprocess.run([ensure_pgbouncer(), "--version"], capture_output=True, text=True).stdout
    statements = sum(
        r.transactions * (1 if r.mode != "tpc-b" else 7) for r in results if r.path == "wardgate"
    )
    meta = {
        "seconds": args.seconds,
        "setup_seconds": args.setup_seconds,
        "clients": args.clients,
        "threads": args.threads,
        "scale": args.scale,
        "runs": args.runs,
        "postgres": run(["pgbench", "--version"]).strip().replace("pgbench (PostgreSQL) ", "PostgreSQL "),
        "pgbouncer": bouncer.splitlines()[0].strip() if bouncer else "pgbouncer",
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "when": time.strftime("%Y-%m-%d %H:%M"),
        "audited": audited,
        "wardgate_statements": statements,
    }
    if args.format == "json":
        body = {
            "meta": meta,
            "results": [asdict(r) for r in results],
            "ratios_to_direct": ratios(best(results)),
        }
        print(json.dumps(body, indent=2))
    else:
        print(report(results, meta))


if __name__ == "__main__":
    main()
