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
    def __init__(
        self, root: Path, *, authentication: str = "", public_host: str = "", extra: str = ""
    ) -> None:
        """`authentication`: YAML lines (indented) for that section; `public_host`: the proxy's
        public address is that host with the proxy's port; `extra`: more top-level sections."""
        self.data_dir = root / "data"
        self.auth_port, self.proxy_port, self.ssh_port = free_port(), free_port(), free_port()
        self.proxy = f"127.0.0.1:{self.proxy_port}"
        self._ca_pems: list[str] = []
        auth_section = f"  authentication:\n{authentication}" if authentication else ""
        proxy_extra = f"  public_addr: {public_host}:{self.proxy_port}\n" if public_host else ""
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
{auth_section}proxy_service:
  listen_addr: 127.0.0.1:{self.proxy_port}
{proxy_extra}ssh_service:
  listen_addr: 127.0.0.1:{self.ssh_port}
  labels: {{env: dev}}
{extra}""",
            wait_for=self.data_dir / "admin.identity",
            wait_ports=(self.auth_port, self.proxy_port, self.ssh_port),
        )
        self.pin = json.loads(wardctl(self.data_dir, "status", "--format", "json").stdout)["ca_pin"]

    def invite(self, name: str, roles: str, logins: str) -> str:
        """`wardctl users add`; returns the invitation token."""
        out = wardctl(self.data_dir, "users", "add", name, f"--roles={roles}", f"--logins={logins}").stdout
        return out.split("--invite=")[1].split()[0]

    def add_user(self, name: str, roles: str, logins: str) -> str:
        """Invite and register through the public API; returns the TOTP secret."""
        from wardgate import runtime
        from wardgate.api.client import AuthClient
        from wardgate.api.identityfile import server_trusting_context

        token = self.invite(name, roles, logins)
        addr = f"127.0.0.1:{self.auth_port}"

        async def go() -> str:
            if not self._ca_pems:  # first contact only: later users reuse the pinned CA
                self._ca_pems = await AuthClient.discover_trust(addr, ca_pin=self.pin)
            async with AuthClient(addr, server_trusting_context(self._ca_pems)) as c:
                info = await c.begin_registration(token)
                # The previous step (inside the ±1 window): the current and next steps stay
                # free for a login and then a per-session MFA code.
                code = current_code(info["totp_secret"], time.time() - 30)
                await c.complete_registration(token, PASSWORD, code)
            return info["totp_secret"]

        return runtime.run(go())


def joined_agent(cluster: SSHCluster, root: Path, role: str, services: str) -> Process:
    """A second `wardgate start` that joins with a `role` token and reaches the cluster only
    through its proxy (reverse tunnel); `services`: its service sections as YAML."""
    out = wardctl(cluster.data_dir, "tokens", "add", f"--type={role}", "--ttl=10m", "--format=json")
    secret = json.loads(out.stdout)["token"]
    return Process(
        root,
        f"""version: v1
wardgate:
  nodename: {role}-agent
  data_dir: {root / "data"}
  proxy_server: {cluster.proxy}
  auth_token: {secret}
  ca_pin: {cluster.pin}
auth_service: {{enabled: false}}
proxy_service: {{enabled: false}}
ssh_service: {{enabled: false}}
{services}""",
    )


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


def login(cluster: SSHCluster, home: Path, user: str, secret: str, *, ttl: str = "") -> None:
    child = pexpect.spawn(
        str(BIN / "ward"),
        ["login", f"--proxy={cluster.proxy}", f"--user={user}", f"--ca-pin={cluster.pin}"]
        + ([f"--ttl={ttl}"] if ttl else []),
        env=ward_env(home),
        encoding="utf-8",
        timeout=30,
    )
    child.expect(f"Password for {user}")
    child.sendline(PASSWORD)
    child.expect("One-time code")
    # The enrolment spent the previous 30 s step; the current one is free.
    child.sendline(current_code(secret))
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


# ---------------------------------------------------------------- the web UI's API

WEB_COOKIE = "__Host-wardgate_session"


class WebCluster(SSHCluster):
    """An SSH cluster whose proxy is reached as https://localhost:PORT (WebAuthn needs a name)."""

    def __init__(self, root: Path, *, authentication: str = "") -> None:
        super().__init__(root, authentication=authentication, public_host="localhost")

    @property
    def origin(self) -> str:
        return f"https://localhost:{self.proxy_port}"

    @property
    def base(self) -> str:
        return f"https://127.0.0.1:{self.proxy_port}"


class WebClient:
    """The web API as a browser script would use it: cookie jar + bearer token, over TLS."""

    def __init__(self, cluster: SSHCluster) -> None:
        import aiohttp

        self.base = f"https://127.0.0.1:{cluster.proxy_port}"
        self.http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=False), cookie_jar=aiohttp.CookieJar(unsafe=True)
        )
        self.token = ""

    async def __aenter__(self) -> WebClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.http.close()

    def headers(self, bearer: bool = True, **extra: str) -> dict[str, str]:
        out = dict(extra)
        if bearer and self.token:
            out["Authorization"] = f"Bearer {self.token}"
        return out

    async def call(self, method: str, path: str, body: object = None, *, bearer: bool = True, **hdrs: str):
        async with self.http.request(
            method, self.base + path, json=body, headers=self.headers(bearer, **hdrs)
        ) as resp:
            data = await resp.json(content_type=None)
            return resp.status, data

    async def sign_in(self, user: str, secret: str, password: str = PASSWORD) -> dict:
        status, data = await self.call(
            "POST",
            "/webapi/sessions/web",
            {"user": user, "password": password, "otp": current_code(secret, time.time() + 30)},
            bearer=False,
        )
        assert status == 201, data
        self.token = data["token"]
        return data

    def cookie(self) -> str:
        for c in self.http.cookie_jar:
            if c.key == WEB_COOKIE:
                return c.value
        return ""
