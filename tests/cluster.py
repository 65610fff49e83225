"""Real `wardgate start` processes for end-to-end tests: config, start, wait, stop."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pexpect

from wardgate.auth.totp import current_code

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, deadline: float) -> bool:
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.05)
    return False


class Process:
    """One `wardgate start -c CONFIG` with its log; `ready` is a file or port to wait for."""

    def __init__(
        self, root: Path, config: str, *, wait_for: Path | None = None, wait_ports: tuple[int, ...] = ()
    ):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.config = root / "wardgate.yaml"
        self.config.write_text(config)
        self.log_path = root / "wardgate.log"
        self.wait_for, self.wait_ports = wait_for, wait_ports
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        log = open(self.log_path, "a")  # noqa: SIM115 - handed to the child, closed below
        self.proc = subprocess.Popen(
            [str(BIN / "wardgate"), "start", "-c", str(self.config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "COLUMNS": "200"},
        )
        log.close()
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            if (
                "Press Ctrl-C to stop." in self.output()
                and all(wait_port(p, deadline) for p in self.wait_ports)
                and (self.wait_for is None or self.wait_for.exists())
            ):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise AssertionError("wardgate did not start:\n" + self.output())

    def output(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def wardctl(
    data_dir: Path, *args: str, check: bool = True, stdin: str | None = None
) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [str(BIN / "wardctl"), "--data-dir", str(data_dir), *args],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=60,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"wardctl {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def audit(data_dir: Path, *args: str) -> list[dict]:
    return json.loads(
        wardctl(data_dir, "audit", "search", "--format", "json", "--limit", "500", *args).stdout
    )


# ---------------------------------------------------------------- auth + proxy + node, users, OpenSSH

CLUSTER = "ssh.example"
STATIC_TOKEN = "node:static-join-token-for-tests"
PASSWORD = "correct horse battery staple"


class SSHCluster(Process):
    def __init__(self, root: Path) -> None:
        self.data_dir = root / "data"
        self.auth_port, self.proxy_port, self.ssh_port = free_port(), free_port(), free_port()
        self.proxy = f"127.0.0.1:{self.proxy_port}"
        super().__init__(
            root,
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
  listen_addr: 127.0.0.1:{self.ssh_port}
  labels: {{env: dev}}
""",
            wait_for=self.data_dir / "admin.identity",
            wait_ports=(self.auth_port, self.proxy_port, self.ssh_port),
        )
        self.pin = json.loads(wardctl(self.data_dir, "status", "--format", "json").stdout)["ca_pin"]

    def add_user(self, name: str, roles: str, logins: str) -> str:
        """Invite and register through the public API; returns the TOTP secret."""
        from wardgate import runtime
        from wardgate.api.client import AuthClient
        from wardgate.api.identityfile import server_trusting_context

        out = wardctl(self.data_dir, "users", "add", name, f"--roles={roles}", f"--logins={logins}").stdout
        token = out.split("--invite=")[1].split()[0]
        addr = f"127.0.0.1:{self.auth_port}"

        async def go() -> str:
            pems = await AuthClient.discover_trust(addr, ca_pin=self.pin)
            async with AuthClient(addr, server_trusting_context(pems)) as c:
                info = await c.begin_registration(token)
                await c.complete_registration(token, PASSWORD, current_code(info["totp_secret"]))
            return info["totp_secret"]

        return runtime.run(go())


def ward_env(home: Path) -> dict[str, str]:
    return {**os.environ, "WARD_HOME": str(home), "COLUMNS": "200"}


def ward(home: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "ward"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=ward_env(home),
        stdin=subprocess.DEVNULL,
    )


def login(cluster: SSHCluster, home: Path, user: str, secret: str) -> None:
    child = pexpect.spawn(
        str(BIN / "ward"),
        ["login", f"--proxy={cluster.proxy}", f"--user={user}", f"--ca-pin={cluster.pin}"],
        env=ward_env(home),
        encoding="utf-8",
        timeout=30,
    )
    child.expect(f"Password for {user}")
    child.sendline(PASSWORD)
    child.expect("One-time code")
    # The enrolment spent the current 30 s step; the next step is inside the ±1 window.
    child.sendline(current_code(secret, time.time() + 30))
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before


@contextmanager
def openssh_server(cluster: SSHCluster, d: Path, name: str = "legacy") -> Iterator[int]:
    """A throw-away OpenSSH sshd trusting the cluster's user CA, with a Wardgate host cert for
    `name`; yields its port."""
    d.mkdir(mode=0o700, exist_ok=True)
    port = free_port()
    key = d / "host_key"
    wardctl(cluster.data_dir, "auth", "sign", f"--host={name}", "--principals=127.0.0.1", "-o", str(key))
    ca = d / "user_ca.pub"
    ca.write_text(wardctl(cluster.data_dir, "auth", "export", "--type=user").stdout)
    cfg = d / "sshd_config"
    cfg.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {key}\nHostCertificate {key}-cert.pub\n"
        f"TrustedUserCAKeys {ca}\nPidFile {d}/sshd.pid\nUsePAM no\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\nLogLevel ERROR\n"
        "Subsystem sftp internal-sftp\n"
    )
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory
    proc = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(cfg)], stderr=subprocess.PIPE)
    try:
        assert wait_port(port, time.monotonic() + 15), "sshd did not start"
        yield port
    finally:
        proc.terminate()
        proc.wait(10)
