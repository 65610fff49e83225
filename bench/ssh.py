"""SSH benchmark: OpenSSH direct, through an OpenSSH jump host (`ssh -J`), and through Wardgate.

    .venv/bin/python bench/ssh.py                          # 1 GiB bulk, 1000 echoes, 200 connections
    .venv/bin/python bench/ssh.py --size 256M --conns 100  # quicker
    .venv/bin/python bench/ssh.py --format json

Everything is started here, on 127.0.0.1 in a temporary directory, and stopped at the end (also
on Ctrl-C or failure): a real all-in-one `wardgate start` (auth + proxy + SSH node, one
process), a user registered with password + TOTP and logged in with the real `ward login`, a
throw-away OpenSSH `sshd` as the jump host (it trusts the cluster's user CA), and, for the last
path, a second `wardgate start` whose node joined through the proxy and is reachable only over
its reverse tunnel. The client is always the real OpenSSH `ssh` with its default algorithms,
the user's key and Wardgate certificate, and host certificates checked against the cluster's
host CA. Paths (`--paths`):

  direct    ssh -> the Wardgate node's own listen port (no proxy)
  jump      ssh -J root@jump-sshd -> the same node port (OpenSSH jump host, its host key
            pinned in known_hosts; OpenSSH's ProxyJump, i.e. `ssh -W` to the jump host)
  wardgate  ssh with the `ward config` block: ProxyCommand `ward proxy ssh` -> Wardgate proxy
            (TLS, ALPN ward-ssh) -> the node port
  tunnel    the same, to the second node: proxy -> reverse tunnel (SSH over TLS) -> edge node

  Reference rows, only when named in --paths (OpenSSH end to end, no Wardgate node):
  openssh   ssh -> the jump sshd itself as the target
  openssh-j ssh -J jump-sshd -> that same sshd as the target

Measured per path:

  bulk      `ssh HOST 'head -c SIZE /dev/zero'`, output counted and dropped; MiB/s from the
            first byte to the last (connection set-up is measured separately), best of --runs
            (the runs are interleaved across paths)
  RTT       --rtts sequential 64-byte line echoes over one `ssh -T HOST cat` session per path
            (--tty: a raw PTY session); p50/p99 us. The sessions are open together and the
            paths take turns in blocks of back-to-back echoes (10 blocks per path).
  setup     --conns `ssh HOST true` per path, each a new connection (ControlMaster no), the
            paths taking turns; p50/p95/p99 ms
  CPU       CPU seconds per GiB of bulk output (fastest run, its one connection set-up
            included), from /proc and getrusage: the
            client (ssh and its ProxyCommand or `ssh -W` child, which this script inherits as
            child subreaper), the all-in-one wardgate process (utime+stime: auth, proxy and
            node), the edge node process, the jump sshd (its reaped per-connection children),
            the remote `head`, and the machine's busy time not accounted to any of these
            ("other load": other work on the box during the run, and softirq).

The machine is shared by clients, servers and proxy and is noisy: read the ratios to `ssh -J`
in the same run, not the absolutes, and check "other load". Expect the `ssh -J` RTT p99 (and
at times its p50) to show ~40 ms stalls: asyncssh (the Wardgate node) sends an empty
SSH_MSG_IGNORE before every packet, so an echo often leaves the node as two TCP segments; the
jump sshd forwards them as two writes on its client connection, where it leaves Nagle on, and
the second waits for the client's delayed ACK. OpenSSH to OpenSSH through the same jump host
(the reference rows) does not stall. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import stdlib_http  # noqa: F401 - before anything imports http: bench/http.py would shadow it

BIN = Path(sys.executable).parent
MiB = 1 << 20
GiB = 1 << 30
CLUSTER = "bench.example"
STATIC_TOKEN = "node:static-join-token-for-bench"
USER = "bench"
LOGIN = "root"
PASSWORD = "correct horse battery staple"
TICKS = os.sysconf("SC_CLK_TCK")
START = time.monotonic()
DEFAULT_PATHS = ("direct", "jump", "wardgate", "tunnel")
REFERENCE_PATHS = ("openssh", "openssh-j")
ALL_PATHS = DEFAULT_PATHS + REFERENCE_PATHS
LABELS = {
    "direct": "direct",
    "jump": "ssh -J",
    "wardgate": "wardgate",
    "tunnel": "wardgate tunnel",
    "openssh": "ref: sshd",
    "openssh-j": "ref: ssh -J sshd",
}
HOSTS = {
    "direct": "direct-node",
    "jump": "jump-node",
    "wardgate": f"main-node.{CLUSTER}",
    "tunnel": f"edge-node.{CLUSTER}",
    "openssh": "sshd-direct",
    "openssh-j": "sshd-jump",
}
NEEDS_SSHD = ("jump", "openssh", "openssh-j")


def progress(msg: str) -> None:
    print(f"[{time.monotonic() - START:6.1f}s] {msg}", file=sys.stderr, flush=True)


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": MiB, "G": GiB}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * q))]


# -- CPU accounting from /proc ---------------------------------------------------------------------


def proc_cpu(pid: int, *, reaped_children: bool = False) -> float:
    """CPU seconds of `pid` (utime+stime), or of the children it has reaped (cutime+cstime);
    0 once the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()  # fields[0] is field 3 (state)
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return ((cutime + cstime) if reaped_children else (utime + stime)) / TICKS


def machine_busy() -> float:
    """Busy CPU seconds of the whole machine, all CPUs (not idle, iowait or steal)."""
    values = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(values[:3] + values[5:7]) / TICKS  # user, nice, system, irq, softirq


def current_totp(secret: str, at: float) -> str:
    from wardgate.auth.totp import current_code

    return current_code(secret, at)


def register_user(wardctl: Any, auth_port: int, pin: str, *, roles: str, logins: str = "") -> str:
    """`wardctl users add` + registration with password and TOTP, as the invitation page does;
    returns the TOTP secret (the current 30 s step is spent)."""
    from wardgate import runtime
    from wardgate.api.client import AuthClient
    from wardgate.api.identityfile import server_trusting_context

    args = ["users", "add", USER, f"--roles={roles}"] + ([f"--logins={logins}"] if logins else [])
    token = wardctl(*args).split("--invite=")[1].split()[0]
    addr = f"127.0.0.1:{auth_port}"

    async def register() -> str:
        pems = await AuthClient.discover_trust(addr, ca_pin=pin)
        async with AuthClient(addr, server_trusting_context(pems)) as c:
            info = await c.begin_registration(token)
            await c.complete_registration(token, PASSWORD, current_totp(info["totp_secret"], time.time()))
        return str(info["totp_secret"])

    return runtime.run(register())


def ward_login(home: Path, proxy_port: int, pin: str, code: str) -> None:
    """The real `ward login` at its prompts (password, then `code`) into WARD_HOME=home."""
    import pexpect  # a dev dependency (the e2e tests use it too)

    child = pexpect.spawn(
        str(BIN / "ward"),
        ["login", f"--proxy=127.0.0.1:{proxy_port}", f"--user={USER}", f"--ca-pin={pin}"],
        env={**os.environ, "WARD_HOME": str(home), "COLUMNS": "200"},
        encoding="utf-8",
        timeout=30,
    )
    try:
        child.expect(f"Password for {USER}")
        child.sendline(PASSWORD)
        child.expect("One-time code")
        child.sendline(code)
        child.expect(pexpect.EOF)
    finally:
        child.close()
    if child.exitstatus != 0:
        raise RuntimeError(f"ward login failed:\n{child.before}")


def audit_count(data_dir: Path, event: str) -> int | None:
    """Events of this type in the auth service's SQLite audit log under `data_dir` (None: not found)."""
    import sqlite3

    for p in sorted(data_dir.rglob("*")):
        if not p.is_file() or p.suffix in (".identity", ".yaml", ".pem", ".key", ".log", ".crt"):
            continue
        try:
            with contextlib.closing(sqlite3.connect(f"file:{p}?mode=ro", uri=True, timeout=10)) as c:
                row = c.execute("SELECT count(*) FROM audit_events WHERE event = ?", (event,)).fetchone()
                return int(row[0])
        except sqlite3.Error:
            continue
    return None


# -- processes -------------------------------------------------------------------------------------


class Server:
    """A long-running helper (wardgate, sshd) with its log in the temp dir; stopped by `stop`."""

    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log_path = log_path
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "COLUMNS": "200", **(env or {})},
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_ready(self, ready: Any, what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}):\n{self.output()}")
            if ready():
                return
            time.sleep(0.05)
        raise RuntimeError(f"{self.name}: no {what} after {timeout:.0f}s:\n{self.output()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def run(
    argv: list[str], *, timeout: float = 60, stdin: str | None = None, env: dict[str, str] | None = None
) -> str:
    proc = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=timeout,
        input=stdin if stdin is not None else "",
        env=env,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


# -- the test bed --------------------------------------------------------------------------------


@dataclass
class Bed:
    """Everything the paths need; `stack` stops it all."""

    tmp: Path
    stack: contextlib.ExitStack
    main: Server | None = None
    edge: Server | None = None
    jump: Server | None = None
    data_dir: Path = Path()
    auth_port: int = 0
    proxy_port: int = 0
    node_port: int = 0
    jump_port: int = 0
    pin: str = ""
    home: Path = Path()
    ssh_config: Path = Path()
    server_env: dict[str, str] = field(default_factory=dict)
    """Extra environment for the wardgate processes (--malloc-tuning)."""
    cipher: str = ""
    """`Ciphers` for every hop (--cipher); empty: OpenSSH's default preference."""
    clients: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def wardctl(self, *args: str) -> str:
        return run([str(BIN / "wardctl"), "--data-dir", str(self.data_dir), *args])

    def ward(self, *args: str) -> str:
        env = {**os.environ, "WARD_HOME": str(self.home), "COLUMNS": "200"}
        proc = subprocess.run(
            [str(BIN / "ward"), *args],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            stdin=subprocess.DEVNULL,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"ward {' '.join(args)} failed:\n{proc.stderr}")
        return proc.stdout

    def start_main(self) -> None:
        self.data_dir = self.tmp / "main" / "data"
        self.auth_port, self.proxy_port, self.node_port = free_port(), free_port(), free_port()
        config = self.tmp / "main" / "wardgate.yaml"
        config.parent.mkdir(parents=True)
        config.write_text(
            f"""version: v1
wardgate:
  nodename: main-node
  data_dir: {self.data_dir}
auth_service:
  listen_addr: 127.0.0.1:{self.auth_port}
  cluster_name: {CLUSTER}
  tokens: ["{STATIC_TOKEN}"]
proxy_service:
  listen_addr: 127.0.0.1:{self.proxy_port}
ssh_service:
  listen_addr: 127.0.0.1:{self.node_port}
  labels: {{env: bench}}
"""
        )
        progress(
            f"starting wardgate (auth :{self.auth_port}, proxy :{self.proxy_port}, node :{self.node_port})"
        )
        self.main = Server(
            "wardgate",
            [str(BIN / "wardgate"), "start", "-c", str(config)],
            config.parent / "wardgate.log",
            self.server_env,
        )
        self.stack.callback(self.main.stop)
        ports = (self.auth_port, self.proxy_port, self.node_port)
        self.main.wait_ready(
            lambda: (
                "Press Ctrl-C to stop." in self.main.output()  # type: ignore[union-attr]
                and (self.data_dir / "admin.identity").exists()
                and all(port_open(p) for p in ports)
            ),
            "readiness",
        )
        self.pin = json.loads(self.wardctl("status", "--format", "json"))["ca_pin"]

    def add_user_and_login(self) -> None:
        progress(f"registering user {USER} (password + TOTP) and running `ward login`")
        secret = register_user(self.wardctl, self.auth_port, self.pin, roles="access", logins=LOGIN)
        self.home = self.tmp / "ward-home"
        # Registration spent the current 30 s step; the next one is inside the ±1 window.
        ward_login(self.home, self.proxy_port, self.pin, current_totp(secret, time.time() + 30))

    def start_jump(self) -> None:
        jdir = self.tmp / "jump"
        jdir.mkdir()
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(jdir / "host_ed25519")])
        (jdir / "user_ca.pub").write_text(self.wardctl("auth", "export", "--type=user"))
        self.jump_port = free_port()
        cfg = jdir / "sshd_config"
        cfg.write_text(
            f"""ListenAddress 127.0.0.1:{self.jump_port}
HostKey {jdir / "host_ed25519"}
PidFile {jdir / "sshd.pid"}
TrustedUserCAKeys {jdir / "user_ca.pub"}
AuthorizedKeysFile none
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
UsePAM no
StrictModes no
AllowTcpForwarding yes
X11Forwarding no
PrintMotd no
UseDNS no
LogLevel ERROR
"""
        )
        sshd = shutil.which("sshd") or "/usr/sbin/sshd"
        progress(f"starting OpenSSH jump host ({sshd}) on :{self.jump_port}")
        self.jump = Server("sshd", [sshd, "-D", "-e", "-f", str(cfg)], jdir / "sshd.log")
        self.stack.callback(self.jump.stop)
        self.jump.wait_ready(lambda: port_open(self.jump_port), "listening port")

    def start_edge(self) -> None:
        edir = self.tmp / "edge"
        edir.mkdir()
        config = edir / "wardgate.yaml"
        config.write_text(
            f"""version: v1
wardgate:
  nodename: edge-node
  data_dir: {edir / "data"}
  proxy_server: 127.0.0.1:{self.proxy_port}
  auth_token: {STATIC_TOKEN.split(":", 1)[1]}
  ca_pin: ["{self.pin}"]
auth_service:
  enabled: false
proxy_service:
  enabled: false
ssh_service:
  listen_addr: 127.0.0.1:0
  labels: {{env: edge}}
"""
        )
        progress("starting the edge node (joins through the proxy, reverse tunnel only)")
        self.edge = Server(
            "wardgate edge",
            [str(BIN / "wardgate"), "start", "-c", str(config)],
            edir / "wardgate.log",
            self.server_env,
        )
        self.stack.callback(self.edge.stop)
        self.edge.wait_ready(lambda: "reverse tunnel to" in self.edge.output(), "tunnel")  # type: ignore[union-attr]
        deadline = time.monotonic() + 30
        while "edge-node" not in self.ward("ls", "env=edge"):
            if time.monotonic() > deadline:
                raise RuntimeError("the edge node never showed up in `ward ls`")
            time.sleep(0.3)

    def write_ssh_config(self) -> None:
        """One ssh_config for all paths (first match wins, so specific blocks come first)."""
        from wardgate.client.profile import ProfileStore

        profile = ProfileStore(self.home).load(f"127.0.0.1:{self.proxy_port}")
        known_hosts = self.tmp / "known_hosts"
        lines = self.wardctl("auth", "export", "--type=host")  # @cert-authority * ... (Wardgate nodes)
        if self.jump_port:  # the jump sshd's own key, pinned
            key = (self.tmp / "jump" / "host_ed25519.pub").read_text().split()[:2]
            lines += f"[127.0.0.1]:{self.jump_port} {' '.join(key)}\n"
        known_hosts.write_text(lines)
        ward_block = self.ward("config")

        def q(path: Path) -> str:
            return '"' + str(path) + '"'

        self.ssh_config = self.tmp / "ssh_config"
        self.ssh_config.write_text(
            f"""# generated by bench/ssh.py
Host jump-sshd sshd-direct
    HostName 127.0.0.1
    Port {self.jump_port}
Host sshd-jump
    HostName 127.0.0.1
    Port {self.jump_port}
    ProxyJump jump-sshd
Host direct-node
    HostName 127.0.0.1
    Port {self.node_port}
    ProxyCommand none
Host jump-node
    HostName 127.0.0.1
    Port {self.node_port}
    ProxyJump jump-sshd

{ward_block}
Host *
    User {LOGIN}
    IdentityFile {q(profile.key_path)}
    CertificateFile {q(profile.cert_path)}
    IdentitiesOnly yes
    UserKnownHostsFile {q(known_hosts)}
    GlobalKnownHostsFile /dev/null
    StrictHostKeyChecking yes
    BatchMode yes
    ControlMaster no
    ControlPath none
    LogLevel ERROR
{f"    Ciphers {self.cipher}" if self.cipher else ""}
"""
        )

    def reap_orphans(self) -> None:
        """Wait for what the clients left behind (ProxyCommand, `ssh -W`): ssh exits without
        reaping them, and as child subreaper we inherit them, so their CPU reaches our
        RUSAGE_CHILDREN like the ssh client's own."""
        ours = {s.pid for s in (self.main, self.edge, self.jump) if s is not None}
        ours |= {p.pid for p in self.clients}
        me = str(os.getpid())
        deadline = time.monotonic() + 10
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) in ours:
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if stat[stat.rindex(")") + 2 :].split()[1] != me:
                continue
            pid = int(entry.name)
            with contextlib.suppress(ChildProcessError):
                while os.waitpid(pid, os.WNOHANG) == (0, 0):
                    if time.monotonic() > deadline:
                        os.kill(pid, signal.SIGKILL)
                    time.sleep(0.01)

    def kill_clients(self) -> None:
        for p in self.clients:
            if p.poll() is None:
                p.kill()
                p.wait()
        self.clients.clear()


# -- measurements --------------------------------------------------------------------------------


@dataclass
class Result:
    path: str
    label: str
    cipher: str = ""
    mib_s: float = 0.0
    bulk_seconds: list[float] = field(default_factory=list)
    cpu_per_gib: dict[str, float] = field(default_factory=dict)
    """Of the fastest run: wardgate (all-in-one), edge, sshd (jump), machine (all CPUs)."""
    rtt_p50_us: float = 0.0
    rtt_p99_us: float = 0.0
    setup_p50_ms: float = 0.0
    setup_p95_ms: float = 0.0
    setup_p99_ms: float = 0.0

    @property
    def proxy_cpu(self) -> float | None:
        """The proxy hop's process: jump sshd, or the all-in-one wardgate (node included on
        `wardgate`, proxy only on `tunnel`)."""
        key = {"jump": "sshd", "wardgate": "wardgate", "tunnel": "wardgate"}.get(self.path)
        return self.cpu_per_gib.get(key) if key else None


class EchoSession:
    """An interactive session running `cat`: write a 64-byte line, read it back."""

    def __init__(self, path: str, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdin is not None and proc.stdout is not None
        self.path, self.proc = path, proc
        self.wfd, self.rfd = proc.stdin.fileno(), proc.stdout.fileno()
        self.msg = os.urandom(31).hex().encode() + b"\n"

    def once(self) -> None:
        os.write(self.wfd, self.msg)
        got = b""
        while len(got) < len(self.msg):
            if not (chunk := os.read(self.rfd, 4096)):
                raise RuntimeError(f"echo session over {self.path} closed early")
            got += chunk
        if got != self.msg:
            raise RuntimeError(f"echo over {self.path} returned {got!r}")


class Bench:
    def __init__(self, bed: Bed, args: argparse.Namespace) -> None:
        self.bed = bed
        self.args = args

    def ssh(self, path: str, *extra: str) -> list[str]:
        return ["ssh", "-F", str(self.bed.ssh_config), *extra[:-1], HOSTS[path], *extra[-1:]]

    def popen(self, argv: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(argv, **kw)
        self.bed.clients.append(p)
        return p

    def finish(self, p: subprocess.Popen[bytes], what: str, timeout: float = 60, check: bool = True) -> None:
        try:
            rc = p.wait(timeout)
        finally:
            self.bed.clients.remove(p)
            self.bed.reap_orphans()
        if check and rc != 0:
            err = p.stderr.read().decode(errors="replace") if p.stderr else ""
            raise RuntimeError(f"{what} failed with exit status {rc}: {err.strip()}")

    def check(self, path: str) -> str:
        """One connection with -v: that the path works, and the cipher it negotiates."""
        proc = subprocess.run(
            self.ssh(path, "-v", "-o", "LogLevel=DEBUG1", "echo ok"),
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
        if proc.returncode != 0 or proc.stdout.strip() != "ok":
            raise RuntimeError(f"path {path}: `ssh {HOSTS[path]} echo ok` failed:\n{proc.stderr[-3000:]}")
        ciphers = re.findall(r"kex: server->client cipher: (\S+)", proc.stderr)
        return " + ".join(dict.fromkeys(ciphers))

    def processes(self, path: str) -> dict[str, tuple[int, bool]]:
        """name -> (pid, reaped_children) whose CPU the bulk runs account."""
        bed = self.bed
        assert bed.main is not None
        if path in REFERENCE_PATHS and bed.jump is not None:  # `head` runs inside sshd's session
            return {"sshd": (bed.jump.pid, True)}
        procs = {"wardgate": (bed.main.pid, False)}
        if path == "jump" and bed.jump is not None:
            procs["sshd"] = (bed.jump.pid, True)
        if path == "tunnel" and bed.edge is not None:
            procs["edge"] = (bed.edge.pid, False)
            procs["command"] = (bed.edge.pid, True)  # `head`, reaped by the node that ran it
        else:
            procs["command"] = (bed.main.pid, True)
        return procs

    def cpu_snapshot(self, path: str) -> dict[str, float]:
        self.bed.reap_orphans()  # leftovers of earlier commands must not count in this window
        snap = {name: proc_cpu(pid, reaped_children=r) for name, (pid, r) in self.processes(path).items()}
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        snap["client"] = ru.ru_utime + ru.ru_stime  # ssh + its ProxyCommand / `ssh -W` (reaped)
        snap["machine"] = machine_busy()
        snap["wall"] = time.monotonic()
        return snap

    def bulk(self, path: str) -> tuple[float, dict[str, float]]:
        size = self.args.size
        before = self.cpu_snapshot(path)
        p = self.popen(
            self.ssh(path, f"head -c {size} /dev/zero"),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert p.stdout is not None
        fd = p.stdout.fileno()
        with contextlib.suppress(OSError):  # bigger pipe: fewer wake-ups for the reader
            import fcntl

            fcntl.fcntl(fd, 1031, MiB)  # F_SETPIPE_SZ
        buf = bytearray(MiB)
        got = first = 0
        start = end = 0.0
        while n := p.stdout.readinto(buf):  # type: ignore[attr-defined]
            end = time.perf_counter()
            if not got:  # the clock starts at the first bytes: connection set-up is not timed
                start, first = end, n
            got += n
        self.finish(p, f"bulk over {path}")
        if got != size:
            raise RuntimeError(f"bulk over {path}: got {got} bytes, expected {size}")
        seconds = (end - start) * size / max(1, size - first)  # as if the first read were timed too
        settle = 0.3
        time.sleep(settle)  # let sshd and the node reap their per-connection children
        after = self.cpu_snapshot(path)
        gib = size / GiB
        cpu = {k: (after[k] - before[k]) / gib for k in before if k != "wall"}
        cpu["ours"] = sum(v for k, v in cpu.items() if k != "machine")
        cpu["other"] = max(0.0, cpu["machine"] - cpu["ours"])
        wall = after["wall"] - before["wall"] - settle
        cpu["busy_cpus"] = (after["machine"] - before["machine"]) / wall
        return seconds, cpu

    def echo_session(self, path: str) -> EchoSession:
        tty = self.args.tty
        argv = (
            self.ssh(path, "-tt", "stty raw -echo; echo READY; exec cat")
            if tty
            else self.ssh(path, "-T", "cat")
        )
        p = self.popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
        session = EchoSession(path, p)
        if tty:  # the PTY echoes until stty has run: start after its marker
            seen = b""
            while b"READY\n" not in seen:
                if not (chunk := os.read(session.rfd, 4096)):
                    raise RuntimeError(f"PTY session over {path} closed early")
                seen += chunk
        for _ in range(20):  # warm up (and wait for the session to be up)
            session.once()
        return session

    def close_echo(self, session: EchoSession) -> None:
        assert session.proc.stdin is not None
        session.proc.stdin.close()
        if self.args.tty:  # a raw PTY does not turn our EOF into cat's: hang up instead
            session.proc.terminate()
        self.finish(session.proc, f"echo session over {session.path}", check=not self.args.tty)

    def round_trips(self, paths: list[str]) -> dict[str, list[float]]:
        """One session per path, all open at once; the paths take turns in blocks of back-to-back
        echoes, so a slow moment of the machine hits every path alike."""
        sessions = [self.echo_session(p) for p in paths]
        times: dict[str, list[float]] = {p: [] for p in paths}
        blocks = 10
        for block in range(blocks):
            for s in sessions:
                n = self.args.rtts * (block + 1) // blocks - self.args.rtts * block // blocks
                for _ in range(n):
                    t = time.perf_counter()
                    s.once()
                    times[s.path].append(time.perf_counter() - t)
        for s in sessions:
            self.close_echo(s)
        return {p: sorted(ts) for p, ts in times.items()}

    def setups(self, paths: list[str]) -> dict[str, list[float]]:
        """`ssh HOST true`, taking turns across the paths."""
        times: dict[str, list[float]] = {p: [] for p in paths}
        step = max(1, self.args.conns // 4)
        for i in range(self.args.conns):
            for path in paths:
                t = time.perf_counter()
                p = self.popen(
                    self.ssh(path, "true"),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                )
                self.finish(p, f"`ssh {HOSTS[path]} true`")
                times[path].append(time.perf_counter() - t)
            if (i + 1) % step == 0 and i + 1 < self.args.conns:
                progress(f"  {i + 1}/{self.args.conns} connections per path")
        return {p: sorted(ts) for p, ts in times.items()}

    def run(self, paths: list[str]) -> list[Result]:
        args = self.args
        results = {p: Result(p, LABELS[p]) for p in paths}
        for p in paths:
            results[p].cipher = self.check(p)
            progress(f"{LABELS[p]} works (cipher {results[p].cipher})")
        for run_no in range(1, args.runs + 1):
            for p in paths:
                progress(f"bulk {args.size / MiB:.0f} MiB over {LABELS[p]} (run {run_no}/{args.runs})")
                secs, cpu = self.bulk(p)
                r = results[p]
                r.bulk_seconds.append(secs)
                if secs <= min(r.bulk_seconds):
                    r.mib_s, r.cpu_per_gib = args.size / MiB / secs, cpu
                progress(f"  {args.size / MiB / secs:.0f} MiB/s")
        progress(f"{args.rtts} round trips per path, paths taking turns")
        for p, rtts in self.round_trips(paths).items():
            results[p].rtt_p50_us = statistics.median(rtts) * 1e6
            results[p].rtt_p99_us = percentile(rtts, 0.99) * 1e6
        progress(f"{args.conns} new connections per path, paths taking turns")
        for p, ts in self.setups(paths).items():
            r = results[p]
            r.setup_p50_ms = statistics.median(ts) * 1e3
            r.setup_p95_ms = percentile(ts, 0.95) * 1e3
            r.setup_p99_ms = percentile(ts, 0.99) * 1e3
        return list(results.values())


# -- output ----------------------------------------------------------------------------------------


def ratio(value: float, base: float | None) -> str:
    return "-" if not base else f"{value / base:.2f}"


def render(cells: list[list[str]], left: int = 1) -> list[str]:
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = [
        "  ".join(
            c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def ratios(results: list[Result]) -> dict[str, dict[str, float]]:
    """Each path against `ssh -J`: throughput (higher is better), latencies (lower is better)."""
    base = next((r for r in results if r.path == "jump"), None)
    if base is None:
        return {}
    return {
        r.path: {
            "throughput": r.mib_s / base.mib_s,
            "rtt_p50": r.rtt_p50_us / base.rtt_p50_us,
            "rtt_p99": r.rtt_p99_us / base.rtt_p99_us,
            "setup_p50": r.setup_p50_ms / base.setup_p50_ms,
            "setup_p99": r.setup_p99_ms / base.setup_p99_ms,
        }
        for r in results
    }


def report(results: list[Result], meta: dict[str, Any]) -> str:
    base = next((r for r in results if r.path == "jump"), None)
    b_mib = base.mib_s if base else None
    b_p99 = base.rtt_p99_us if base else None
    b_setup = base.setup_p50_ms if base else None
    head = ["path", "MiB/s", "x ssh -J", "RTT p50 us", "p99 us", "x ssh -J"]
    head += ["setup p50/p95/p99 ms", "x ssh -J", "proxy CPU-s/GiB"]
    rows = [head]
    for r in results:
        cpu = r.proxy_cpu
        rows.append(
            [
                r.label,
                f"{r.mib_s:.0f}",
                ratio(r.mib_s, b_mib),
                f"{r.rtt_p50_us:.0f}",
                f"{r.rtt_p99_us:.0f}",
                ratio(r.rtt_p99_us, b_p99),
                f"{r.setup_p50_ms:.0f} / {r.setup_p95_ms:.0f} / {r.setup_p99_ms:.0f}",
                ratio(r.setup_p50_ms, b_setup),
                "-" if cpu is None else f"{cpu:.2f}" + ("*" if r.path == "wardgate" else ""),
            ]
        )
    session = "one `ssh -tt` PTY session (raw, cat)" if meta["tty"] else "one `ssh -T HOST cat` session"
    out = [
        f"bulk: {meta['size_mib']:.0f} MiB of `head -c` output, best of {meta['runs']};"
        f" RTT: {meta['rtts']} x 64-byte lines echoed over {session};"
        f" setup: {meta['conns']} x `ssh HOST true`",
        f"{meta['openssh']}, python {meta['python']}, {meta['cpus']} CPUs shared by clients, servers and"
        f" proxy, wardgate {meta['malloc']}, {meta['when']}",
        "cipher: " + "; ".join(f"{r.label}: {r.cipher}" for r in results),
        "",
        *render(rows),
        "",
        "x ssh -J: MiB/s, RTT p99 and setup p50 divided by the ssh -J row's.",
        "proxy CPU: ssh -J = the jump sshd; wardgate = the all-in-one process (*: its node is in it too);",
        "wardgate tunnel = the all-in-one process (auth + proxy; the edge node is a separate process).",
        "",
        "CPU seconds per GiB of bulk output (fastest run), by process:",
    ]
    cpu_head = ["path", "client", "wardgate all-in-one", "edge node", "OpenSSH sshd", "head", "sum"]
    cpu_rows = [[*cpu_head, "other load", "machine busy"]]
    roles = {"direct": "node", "jump": "node", "wardgate": "proxy+node", "tunnel": "auth+proxy"}
    for r in results:
        c = r.cpu_per_gib

        def cell(key: str, c: dict[str, float] = c) -> str:
            return f"{c[key]:.2f}" if key in c else "-"

        cpu_rows.append(
            [
                r.label,
                cell("client"),
                f"{c['wardgate']:.2f} ({roles[r.path]})" if "wardgate" in c else "-",
                cell("edge"),
                cell("sshd"),
                cell("command"),
                cell("ours"),
                cell("other"),
                f"{c['busy_cpus']:.2f} of {meta['cpus']} CPUs",
            ]
        )
    out += render(cpu_rows)
    out += [
        "client = ssh + its ProxyCommand (`ward proxy ssh`) or `ssh -W` child; head = the remote",
        "command; other load = busy CPU time of the machine not accounted to any of these.",
    ]
    if any(r.path in REFERENCE_PATHS for r in results):
        out.append("ref rows: the sshd column holds both hops (jump and target) and the remote `head`.")
    rs = ratios(results)
    if rs:
        out += ["", "Against ssh -J in this run (throughput: higher is better; latencies: lower is better):"]
        for r in results:
            if r.path == "jump":
                continue
            x = rs[r.path]
            out.append(
                f"  {r.label:<16} throughput {x['throughput']:.2f}x  RTT p50 {x['rtt_p50']:.2f}x"
                f"  p99 {x['rtt_p99']:.2f}x  setup p50 {x['setup_p50']:.2f}x  p99 {x['setup_p99']:.2f}x"
            )
        for r in results:
            if r.path in ("wardgate", "tunnel"):
                x = rs[r.path]
                verdict = "met" if x["throughput"] >= 1.0 and x["rtt_p99"] <= 1.0 else "NOT met"
                out.append(
                    f"  target (throughput >= ssh -J and RTT p99 <= ssh -J) for {r.label}: {verdict}"
                    f" (throughput {x['throughput']:.2f}x, RTT p99 {x['rtt_p99']:.2f}x,"
                    f" p50 {x['rtt_p50']:.2f}x)"
                )
    return "\n".join(out)


# -- main ------------------------------------------------------------------------------------------

MALLOC_ENV = {
    # DESIGN.md "Data-plane facts": stops glibc from trimming and re-faulting the heap per buffer.
    "MALLOC_MMAP_THRESHOLD_": str(64 * MiB),
    "MALLOC_TRIM_THRESHOLD_": str(256 * MiB),
    "MALLOC_TOP_PAD_": str(64 * MiB),
}


def become_subreaper() -> None:
    """Inherit the processes ssh leaves behind, so their CPU time can be counted (Linux)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_child_subreaper = 36
    if libc.prctl(pr_set_child_subreaper, 1, 0, 0, 0) != 0:
        progress("prctl(PR_SET_CHILD_SUBREAPER) failed: client CPU will miss the ProxyCommand")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--size", type=parse_size, default=GiB, help="bulk bytes per run (e.g. 256M, 1G; default 1G)"
    )
    ap.add_argument("--runs", type=int, default=2, help="bulk runs per path, the fastest counts (default 2)")
    ap.add_argument("--rtts", type=int, default=1000, help="echo round trips per path (default 1000)")
    ap.add_argument("--conns", type=int, default=200, help="new connections per path (default 200)")
    ap.add_argument(
        "--paths",
        default=",".join(DEFAULT_PATHS),
        help=f"comma-separated, from {','.join(ALL_PATHS)} (default {','.join(DEFAULT_PATHS)};"
        " ratios need jump; openssh and openssh-j are OpenSSH-only reference rows)",
    )
    ap.add_argument(
        "--tty",
        action="store_true",
        help="echo round trips over a PTY session (`ssh -tt`, `stty raw -echo; cat`; Wardgate records"
        " it) instead of `ssh -T HOST cat`",
    )
    ap.add_argument(
        "--malloc-tuning",
        action="store_true",
        help="run wardgate with the glibc allocator settings of DESIGN.md (default: as shipped)",
    )
    ap.add_argument(
        "--cipher",
        default="",
        help="SSH cipher for every hop, e.g. aes128-gcm@openssh.com (default: OpenSSH's preference)",
    )
    ap.add_argument("--format", choices=["text", "json"], default="text", help="result format on stdout")
    ap.add_argument(
        "--keep", action="store_true", help="keep the temp dir (configs, logs) and print its path"
    )
    args = ap.parse_args()
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    if bad := [p for p in paths if p not in ALL_PATHS]:
        ap.error(f"unknown path(s) {', '.join(bad)}; choose from {', '.join(ALL_PATHS)}")
    if not paths or args.size < 1 or args.runs < 1 or args.rtts < 1 or args.conns < 1:
        ap.error("--paths must name a path; --size, --runs, --rtts and --conns must be positive")
    for tool in ("ssh", "ssh-keygen"):
        if shutil.which(tool) is None:
            ap.error(f"{tool} (OpenSSH) is not installed")
    if set(paths) & set(NEEDS_SSHD) and not (shutil.which("sshd") or Path("/usr/sbin/sshd").exists()):
        ap.error(f"sshd (OpenSSH server) is not installed: drop {', '.join(NEEDS_SSHD)} from --paths")

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    become_subreaper()
    tmp = Path(tempfile.mkdtemp(prefix="wardgate-bench-ssh-"))
    results: list[Result] = []
    try:
        with contextlib.ExitStack() as stack:
            bed = Bed(tmp, stack, server_env=MALLOC_ENV if args.malloc_tuning else {}, cipher=args.cipher)
            bed.start_main()
            bed.add_user_and_login()
            if set(paths) & set(NEEDS_SSHD):
                bed.start_jump()
            if "tunnel" in paths:
                bed.start_edge()
            bed.write_ssh_config()
            stack.callback(bed.kill_clients)  # runs first: clients before the servers
            results = Bench(bed, args).run(paths)
            progress("stopping")
    except KeyboardInterrupt:
        progress("interrupted: everything started has been stopped")
        sys.exit(130)
    finally:
        if args.keep:
            progress(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    openssh = subprocess.run(["ssh", "-V"], capture_output=True, text=True).stderr.strip().split(",")[0]
    meta = {
        "size_mib": args.size / MiB,
        "runs": args.runs,
        "rtts": args.rtts,
        "conns": args.conns,
        "tty": args.tty,
        "openssh": openssh,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "malloc": "with malloc tuning" if args.malloc_tuning else "as shipped (glibc malloc defaults)",
        "when": time.strftime("%Y-%m-%d %H:%M"),
    }
    if args.format == "json":
        body = {"meta": meta, "results": [asdict(r) for r in results], "ratios_to_ssh_j": ratios(results)}
        print(json.dumps(body, indent=2))
    else:
        print(report(results, meta))


if __name__ == "__main__":
    main()
