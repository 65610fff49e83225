"""The SSH node service against the real OpenSSH client: exec, PTY, sftp, scp, forwarding, refusals.

The node runs on its own event loop in a background thread, so the tests can drive blocking
clients (`ssh`, `sftp`, `scp`, pexpect) directly and still let the server answer.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import pwd
import re
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncssh
import pexpect
import pytest
import uvloop

from wardgate.agent.ssh import SessionRegistry, SSHNodeOptions, SSHNodeService, node_resource
from wardgate.agent.ssh.labels import CommandLabels
from wardgate.agent.ssh.registry import MAX_BACKLOG, LiveSession
from wardgate.agent.ssh.session import env_allowed, scp_request
from wardgate.api.cache import ResourceCache
from wardgate.api.events import ResourceEvent, ResourceEventType
from wardgate.api.resources import (
    Lock,
    LockSpec,
    LockTarget,
    Node,
    NodeSpec,
    Role,
    RoleConditions,
    RoleOptions,
    RoleSpec,
)
from wardgate.audit.events import MemoryEmitter
from wardgate.audit.recording import iter_events, output_text, read_header
from wardgate.auth.ca import CertSigner, new_cert_authority
from wardgate.auth.identity import Identity
from wardgate.config import CommandLabelConfig, SSHServiceConfig
from wardgate.keys import generate_ssh_key, ssh_private_key_openssh
from wardgate.protocols.sftp import SftpOp, SftpWatcher

CLUSTER = "test.example"
HOUR = timedelta(hours=1)
UUID_RE = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the node tests switch users: run as root")


def _other_login() -> str | None:
    """An existing non-root account with a real shell, to prove sessions really run as the login."""
    for pw in pwd.getpwall():
        if pw.pw_uid >= 1000 and pw.pw_uid != 65534 and pw.pw_shell.endswith(("bash", "/sh", "zsh")):
            return pw.pw_name
    return None


OTHER = _other_login()


def role(name: str, logins: list[str], **options: Any) -> Role:
    return Role.new(
        name,
        RoleSpec(
            allow=RoleConditions(logins=logins, node_labels={"env": "test"}),
            options=RoleOptions(**options),
        ),
    )


ROLES = [
    role("dev", ["root", *([OTHER] if OTHER else []), "no-such-user-here"]),
    role("noforward", ["root"], port_forwarding=False),
    role("idle", ["root"], client_idle_timeout=timedelta(seconds=1)),
    role("agent", ["root", *([OTHER] if OTHER else [])], forward_agent=True),
    role("expiring", ["root"], disconnect_expired_cert=True),
    role("mfa", ["root"], require_session_mfa=True),
    role("prod-only", ["root"]).model_copy(
        update={"spec": RoleSpec(allow=RoleConditions(logins=["root"], node_labels={"env": "prod"}))}
    ),
]


class NodeHarness:
    """A running node plus everything a client needs: CA keys, certs on disk, known_hosts."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.user_ca = new_cert_authority("user", CLUSTER)
        self.host_ca = new_cert_authority("host", CLUSTER)
        self.signer = CertSigner(self.user_ca)
        host_key = generate_ssh_key()
        host_cert = CertSigner(self.host_ca).sign_ssh_host_cert(
            host_key.public_key(),
            host_id="0f6d1c6e-host",
            node_name="node-1",
            cluster=CLUSTER,
            system_role="node",
            extra_principals=["127.0.0.1", "localhost"],
            ttl=HOUR,
        )
        self.known_hosts = tmp / "known_hosts"
        self.known_hosts.write_text(f"@cert-authority * {self.host_ca.spec.active_keys[0].ssh_public_key}\n")
        self.cache = ResourceCache(["role", "lock", "user"])
        for i, r in enumerate(ROLES, 1):
            self.cache.apply(ResourceEvent(ResourceEventType.PUT, "role", r.name, i, r))
        self.cache.apply(ResourceEvent(ResourceEventType.INIT))
        self.emitter = MemoryEmitter()
        self.node = Node.new(
            "node-1", NodeSpec(hostname="node-1", host_id="0f6d1c6e-host"), labels={"env": "test"}
        )
        self.recordings = tmp / "recordings"
        self.loop = uvloop.new_event_loop()  # what `wardgate start` runs on
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.service = SSHNodeService(
            host_key=ssh_private_key_openssh(host_key),
            host_cert=host_cert,
            user_ca_keys=lambda: [self.user_ca.spec.active_keys[0].ssh_public_key],
            cache=self.cache,
            node=self.node,
            emitter=self.emitter,
            recordings_dir=self.recordings,
            options=SSHNodeOptions(
                cluster_name=CLUSTER,
                commands=[CommandLabelConfig(name="arch", command=["uname", "-m"], period=HOUR)],
            ),
        )
        self.port = self.call(self.service.start("127.0.0.1", 0))
        self._n = 0

    def call(self, coro: Coroutine[Any, Any, Any], timeout: float = 15) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def in_loop(self, fn: Callable[[], Any]) -> Any:
        async def run() -> Any:
            return fn()

        return self.call(run())

    def close(self) -> None:
        try:
            self.call(self.service.close(), timeout=30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()

    # ------------------------------------------------------------ credentials

    def identity(self, user: str = "alice", roles: tuple[str, ...] = ("dev",), logins=("root",)) -> Identity:
        return Identity(user=user, roles=roles, logins=tuple(logins), cluster=CLUSTER)

    def creds(
        self,
        identity: Identity | None = None,
        *,
        signer: CertSigner | None = None,
        now: datetime | None = None,
        ttl: timedelta = HOUR,
        forwarding: bool = True,
    ) -> tuple[Path, Path]:
        """A key and cert on disk, as `ward login` leaves them."""
        self._n += 1
        key = generate_ssh_key()
        kpath = self.tmp / f"id_{self._n}"
        kpath.write_text(ssh_private_key_openssh(key))
        kpath.chmod(0o600)
        cert = (signer or self.signer).sign_ssh_user_cert(
            key.public_key(),
            identity or self.identity(),
            ttl=ttl,
            now=now,
            permit_port_forwarding=forwarding,
            permit_agent_forwarding=True,
        )
        cpath = self.tmp / f"id_{self._n}-cert.pub"
        cpath.write_text(cert + "\n")
        return kpath, cpath

    def ssh_opts(self, creds: tuple[Path, Path], *, agent: bool = False) -> list[str]:
        """Options that make `ssh` use only these credentials (and the agent only when asked)."""
        key, cert = creds
        return [
            "-F", "/dev/null",
            "-o", f"UserKnownHostsFile={self.known_hosts}",
            "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "StrictHostKeyChecking=yes",
            "-o", "IdentitiesOnly=yes",
            *([] if agent else ["-o", "IdentityAgent=none"]),
            "-o", "BatchMode=yes",
            "-o", "ConnectTimeout=10",
            "-i", str(key),
            "-o", f"CertificateFile={cert}",
        ]  # fmt: skip

    def ssh(
        self, creds, command: str | None, *opts: str, login: str = "root", agent: bool = False, **kw: Any
    ) -> subprocess.CompletedProcess[str]:
        cmd = ["ssh", *self.ssh_opts(creds, agent=agent), "-p", str(self.port), *opts, f"{login}@127.0.0.1"]
        if command is not None:
            cmd.append(command)
        kw.setdefault("timeout", 20)
        return subprocess.run(cmd, capture_output=True, text=True, **kw)

    # ------------------------------------------------------------ audit

    def wait_event(self, pred: Callable[[dict], bool], what: str, timeout: float = 10) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for e in list(self.emitter.events):
                if pred(e):
                    return e
            time.sleep(0.02)
        names = [(e["event"], e.get("sid", ""), e.get("reason", "")) for e in self.emitter.events]
        raise AssertionError(f"no audit event {what}; have {names}")

    def put(self, kind: str, resource: Any) -> None:
        ev = ResourceEvent(
            ResourceEventType.PUT, kind, resource.name, 100 + len(self.emitter.events), resource
        )
        self.in_loop(lambda: self.cache.apply(ev))

    def delete(self, kind: str, name: str) -> None:
        self.in_loop(lambda: self.cache.apply(ResourceEvent(ResourceEventType.DELETE, kind, name, 10_000)))


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeHarness]:
    n = NodeHarness(tmp_path_factory.mktemp("node"))
    yield n
    n.close()


@pytest.fixture(scope="module")
def alice(node: NodeHarness) -> tuple[Path, Path]:
    return node.creds()


def by_sid(sid: str, event: str) -> Callable[[dict], bool]:
    return lambda e: e["event"] == event and e.get("sid") == sid


def start_of(command: str) -> Callable[[dict], bool]:
    return lambda e: e["event"] == "session.start" and e.get("command") == command


def file_event(event: str, action: str, path: Path) -> Callable[[dict], bool]:
    return lambda e: e["event"] == event and e["action"] == action and e["path"] == str(path)


# ---------------------------------------------------------------- exec


def test_exec_prints_output_and_audits(node: NodeHarness, alice) -> None:
    r = node.ssh(alice, "echo hi")
    assert (r.returncode, r.stdout) == (0, "hi\n"), r.stderr
    start = node.wait_event(start_of("echo hi"), "session.start")
    assert re.fullmatch(UUID_RE, start["sid"])
    assert start["user"] == "alice" and start["login"] == "root"
    assert start["server_id"] == "0f6d1c6e-host" and start["interactive"] is False
    assert start["remote_addr"].startswith("127.0.0.1:")
    ex = node.wait_event(by_sid(start["sid"], "exec"), "exec")
    assert ex["command"] == "echo hi" and ex["exit_code"] == 0 and ex["code"] == "W2004I"
    end = node.wait_event(by_sid(start["sid"], "session.end"), "session.end")
    assert end["bytes_out"] == 3 and end["participants"] == ["alice"]


def test_exit_status_and_signal_pass_through(node: NodeHarness, alice) -> None:
    r = node.ssh(alice, "echo out; echo err >&2; exit 7")
    assert (r.returncode, r.stdout, r.stderr) == (7, "out\n", "err\n")
    r = node.ssh(alice, "kill -TERM $$")
    assert r.returncode == 255  # OpenSSH's status for a remote command killed by a signal
    ex = node.wait_event(lambda e: e["event"] == "exec" and e["command"] == "kill -TERM $$", "exec")
    assert ex["signal"] == "TERM" and ex["exit_code"] == 143 and ex["success"] is False


def test_stdin_reaches_the_command_and_bulk_output_is_complete(node: NodeHarness, alice) -> None:
    data = "".join(f"line {i}\n" for i in range(20000))
    r = node.ssh(alice, "sha256sum", input=data)
    assert r.stdout.split()[0] == hashlib.sha256(data.encode()).hexdigest()
    r = node.ssh(alice, "head -c 3000000 /dev/zero | tr '\\0' x")
    assert r.returncode == 0 and len(r.stdout) == 3_000_000


def test_certificate_expiry_ends_the_session_when_roles_ask(node: NodeHarness) -> None:
    creds = node.creds(node.identity(roles=("expiring",)), ttl=timedelta(seconds=3))
    r = node.ssh(creds, "echo started; sleep 20", timeout=15)
    assert r.stdout == "started\n" and r.returncode != 0
    assert "your certificate expired at" in r.stderr


def test_environment_allow_list_and_session_id(node: NodeHarness, alice) -> None:
    r = node.ssh(
        alice,
        'echo "$LANG|$EVIL|$WARD_TICKET|$LC_ALL|$USER|$HOME|$WARD_USER|$WARD_SESSION_ID"',
        "-o", "SetEnv=LANG=C.UTF-8 EVIL=1 WARD_TICKET=T-42 LC_ALL=C",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    lang, evil, ticket, lc_all, user, home, ward_user, sid = r.stdout.strip().split("|")
    assert (lang, evil, ticket, lc_all) == ("C.UTF-8", "", "T-42", "C")
    assert (user, home, ward_user) == ("root", pwd.getpwnam("root").pw_dir, "alice")
    assert re.fullmatch(UUID_RE, sid)
    node.wait_event(by_sid(sid, "session.end"), "session.end with the id the session saw")


@pytest.mark.skipif(OTHER is None, reason="no non-root account with a shell on this host")
def test_session_runs_as_the_login(node: NodeHarness) -> None:
    assert OTHER is not None
    creds = node.creds(node.identity(logins=("root", OTHER)))
    r = node.ssh(creds, 'id -un; id -u; echo "$HOME"; umask', login=OTHER)
    assert r.returncode == 0, r.stderr
    pw = pwd.getpwnam(OTHER)
    assert r.stdout.split() == [OTHER, str(pw.pw_uid), pw.pw_dir, "0022"]


# ---------------------------------------------------------------- refusals


def refused(r: subprocess.CompletedProcess[str], text: str) -> None:
    assert r.returncode == 255, (r.stdout, r.stderr)
    assert "Permission denied" in r.stderr, r.stderr
    assert text in r.stderr, r.stderr


def test_login_not_in_certificate_is_refused_and_audited(node: NodeHarness, alice) -> None:
    r = node.ssh(alice, "true", login="bob")
    refused(r, 'access denied: login "bob" is not in your certificate (its logins: root)')
    ev = node.wait_event(lambda e: e["event"] == "auth" and e.get("login") == "bob", "auth failure")
    assert ev["success"] is False and ev["code"] == "W1600W" and ev["user"] == "alice"
    assert ev["server_id"] == "0f6d1c6e-host" and ev["remote_addr"].startswith("127.0.0.1:")
    assert "not in your certificate" in ev["reason"]


def test_roles_must_allow_the_node(node: NodeHarness) -> None:
    creds = node.creds(node.identity(roles=("prod-only",)))
    refused(node.ssh(creds, "true"), 'no role allows login "root" on node "node-1"')


def test_session_mfa_required_by_role(node: NodeHarness) -> None:
    plain = node.creds(node.identity(roles=("mfa",)))
    refused(node.ssh(plain, "true"), "your roles require multi-factor authentication for every session")
    verified = node.creds(replace(node.identity(roles=("mfa",)), mfa_verified="yubikey-1"))
    assert node.ssh(verified, "echo ok").stdout == "ok\n"


def test_login_missing_on_host_is_refused(node: NodeHarness) -> None:
    creds = node.creds(node.identity(logins=("no-such-user-here",)))
    refused(node.ssh(creds, "true", login="no-such-user-here"), "does not exist on this host")


def test_locked_user_is_refused(node: NodeHarness) -> None:
    creds = node.creds(node.identity(user="mallory"))
    assert node.ssh(creds, "true").returncode == 0
    lock = Lock.new("lock-mallory", LockSpec(target=LockTarget(user="mallory"), message="incident 7"))
    node.put("lock", lock)
    try:
        refused(node.ssh(creds, "true"), 'locked: incident 7 (lock "lock-mallory"')
        ev = node.wait_event(lambda e: e["event"] == "auth" and e["user"] == "mallory", "auth failure")
        assert "incident 7" in ev["reason"]
    finally:
        node.delete("lock", "lock-mallory")


def test_lock_ends_a_live_session(node: NodeHarness) -> None:
    creds = node.creds(node.identity(user="trudy"))
    cmd = ["ssh", *node.ssh_opts(creds), "-p", str(node.port), "root@127.0.0.1", "echo started; sleep 30"]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as p:
        assert p.stdout is not None and p.stdout.readline() == "started\n"
        node.put("lock", Lock.new("lock-node", LockSpec(target=LockTarget(node="node-1", user="trudy"))))
        try:
            _, err = p.communicate(timeout=15)
        finally:
            node.delete("lock", "lock-node")
    assert p.returncode != 0
    assert 'locked: user "trudy", node "node-1" is locked' in err


def test_expired_certificate_is_refused(node: NodeHarness) -> None:
    creds = node.creds(node.identity(user="late-larry"), now=datetime.now(UTC) - 3 * HOUR, ttl=HOUR)
    refused(node.ssh(creds, "true"), "access denied: certificate expired at")
    ev = node.wait_event(lambda e: e["event"] == "auth" and "expired" in e.get("reason", ""), "auth failure")
    assert ev["user"] == "late-larry"  # signed by our CA, so we can say whose it was


def test_foreign_ca_is_refused(node: NodeHarness) -> None:
    other = CertSigner(new_cert_authority("user", "evil.example"))
    refused(node.ssh(node.creds(signer=other), "true"), "certificate is not signed by a trusted Wardgate CA")
    ev = node.wait_event(
        lambda e: e["event"] == "auth" and "trusted Wardgate CA" in e.get("reason", ""), "auth failure"
    )
    assert ev["user"] == ""  # nobody we can vouch for


def test_too_many_refused_certificates_drop_the_connection(node: NodeHarness) -> None:
    past = datetime.now(UTC) - 3 * HOUR
    creds = [node.creds(node.identity(user="prober"), now=past, ttl=HOUR) for _ in range(8)]
    cmd = ["ssh", *node.ssh_opts(creds[0])]
    for key, cert in creds[1:]:
        cmd += ["-i", str(key), "-o", f"CertificateFile={cert}"]
    r = subprocess.run([*cmd, "-p", str(node.port), "root@127.0.0.1", "true"], capture_output=True, text=True)
    assert r.returncode == 255 and "too many refused certificates" in r.stderr, r.stderr
    node.call(node.service._audit.flush())  # every queued audit event written
    assert len([e for e in node.emitter.events if e["event"] == "auth" and e["user"] == "prober"]) == 6


def test_plain_key_is_refused(node: NodeHarness, tmp_path: Path) -> None:
    key = tmp_path / "plain"
    key.write_text(ssh_private_key_openssh(generate_ssh_key()))
    key.chmod(0o600)
    cmd = ["ssh", *node.ssh_opts((key, Path("/dev/null")))[:-2], "-p", str(node.port)]
    r = subprocess.run([*cmd, "root@127.0.0.1", "true"], capture_output=True, text=True, timeout=20)
    assert r.returncode == 255 and "Permission denied (publickey)" in r.stderr
    assert "access denied" not in r.stderr  # plain keys are not even considered


# ---------------------------------------------------------------- interactive


def test_interactive_pty_session_is_recorded_and_shareable(node: NodeHarness, alice) -> None:
    cmd = ["-tt", *node.ssh_opts(alice), "-p", str(node.port), "root@127.0.0.1"]
    child = pexpect.spawn("ssh", cmd, env={**os.environ, "TERM": "xterm"}, encoding="utf-8", timeout=15)
    child.setwinsize(30, 100)
    try:
        start = node.wait_event(lambda e: e["event"] == "session.start" and e["interactive"], "pty start")
        sid = start["sid"]
        assert start["terminal_size"] == "100x30" and start["recorded"] is True
        child.sendline("echo hello-$((6*7)) $WARD_SESSION_ID")
        child.expect(f"hello-42 {sid}")
        child.setwinsize(40, 120)  # ssh sends window-change on SIGWINCH
        child.sendline("stty size; tty")
        child.expect(r"40 120\s+/dev/pts/\d+")

        # Another participant joins: observers see output, peers can type.
        live = node.service.sessions.get(sid)
        assert live is not None
        peer = node.in_loop(lambda: live.join("bob", "peer"))
        watcher = node.in_loop(lambda: live.join("carol", "observer"))
        child.sendline("echo shared-$((5+5))")
        child.expect("shared-10")
        node.in_loop(lambda: peer.write(b"echo from-peer-$((2+3))\r"))
        child.expect("from-peer-5")
        seen = b""
        while b"from-peer-5" not in seen:
            ev = node.call(asyncio.wait_for(watcher.next_event(), 10))
            assert ev.kind in ("o", "r")
            seen += ev.data
        assert b"shared-10" in seen
        with pytest.raises(PermissionError):
            node.in_loop(lambda: watcher.write(b"rm -rf /\r"))
        node.wait_event(lambda e: e["event"] == "session.join" and e["user"] == "carol", "join")

        child.sendline("exit 3")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 3
    end = node.wait_event(by_sid(sid, "session.end"), "session.end")
    assert end["interactive"] is True and end["participants"] == ["alice", "bob", "carol"]
    assert node.service.sessions.get(sid) is None
    while (ev := node.call(asyncio.wait_for(watcher.next_event(), 5))).kind != "end":
        pass
    assert ev.reason == "session ended"

    gz = node.recordings / f"{sid}.cast.gz"
    deadline = time.monotonic() + 10
    while not gz.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gz.exists() and not (node.recordings / f"{sid}.cast.part").exists()
    header = read_header(gz)
    assert (header["width"], header["height"], header["title"]) == (100, 30, sid)
    assert header["env"]["TERM"] == "xterm"
    text = output_text(gz)
    assert "hello-42" in text and "from-peer-5" in text
    assert any(e.code == "r" and e.data == "120x40" for e in iter_events(gz))
    assert not any(e.code == "i" for e in iter_events(gz))  # input is not recorded by default


def test_idle_timeout_disconnects(node: NodeHarness) -> None:
    creds = node.creds(node.identity(roles=("idle",)))
    r = node.ssh(creds, "sleep 20", "-T", stdin=subprocess.PIPE, timeout=15)
    assert r.returncode != 0
    assert "client exceeded the idle timeout of 1s" in r.stderr + r.stdout


# ---------------------------------------------------------------- files


def test_sftp_put_and_get(node: NodeHarness, alice, tmp_path: Path) -> None:
    src = tmp_path / "up.bin"
    src.write_bytes(os.urandom(300_000) + "é".encode())
    remote = tmp_path / "remote.bin"
    back = tmp_path / "back.bin"
    batch = tmp_path / "batch"
    batch.write_text(f"put {src} {remote}\nget {remote} {back}\nrm {remote}\n")
    cmd = ["sftp", *node.ssh_opts(alice), "-P", str(node.port), "-b", str(batch), "root@127.0.0.1"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert back.read_bytes() == src.read_bytes() and not remote.exists()
    for action in ("write", "read", "remove"):
        ev = node.wait_event(file_event("sftp", action, remote), action)
        assert ev["success"] is True and ev["user"] == "alice"


def test_sftp_failure_is_audited(node: NodeHarness, alice, tmp_path: Path) -> None:
    batch = tmp_path / "batch"
    local = tmp_path / "x"
    local.write_text("x")
    missing = tmp_path / "nope" / "x"
    batch.write_text(f"-put {local} {missing}\n")
    cmd = ["sftp", *node.ssh_opts(alice), "-P", str(node.port), "-b", str(batch), "root@127.0.0.1"]
    subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    ev = node.wait_event(lambda e: e["event"] == "sftp" and e["path"] == str(missing), "failed sftp write")
    assert ev["success"] is False and ev["code"] == "W2006E" and ev["action"] == "write"
    assert "No such file" in ev["error"]


@pytest.mark.skipif(OTHER is None, reason="no non-root account with a shell on this host")
def test_sftp_runs_as_the_login(node: NodeHarness, tmp_path: Path) -> None:
    assert OTHER is not None
    pw = pwd.getpwnam(OTHER)
    creds = node.creds(node.identity(logins=(OTHER,)))
    src = tmp_path / "mine.txt"
    src.write_text("hello")
    shared = Path("/tmp") / f"wardgate-sftp-{os.getpid()}-{time.monotonic_ns()}"
    batch = tmp_path / "batch"
    batch.write_text(f"pwd\n-put {src} /root/forbidden.txt\nput {src} {shared}\n")
    cmd = ["sftp", *node.ssh_opts(creds), "-P", str(node.port), "-b", str(batch), f"{OTHER}@127.0.0.1"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        assert f"Remote working directory: {pw.pw_dir}" in r.stdout
        assert "Permission denied" in r.stderr and not Path("/root/forbidden.txt").exists()
        assert shared.stat().st_uid == pw.pw_uid and shared.read_text() == "hello"
    finally:
        shared.unlink(missing_ok=True)


@pytest.mark.parametrize("legacy", [True, False], ids=["scp-protocol", "sftp-protocol"])
def test_scp_both_directions(node: NodeHarness, alice, tmp_path: Path, legacy: bool) -> None:
    src = tmp_path / "a.txt"
    src.write_text("scp payload\n" * 1000)
    remote = tmp_path / "remote.txt"
    back = tmp_path / "back.txt"
    base = ["scp", *(["-O"] if legacy else []), *node.ssh_opts(alice), "-P", str(node.port)]
    r = subprocess.run(
        [*base, str(src), f"root@127.0.0.1:{remote}"], capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 0, r.stderr
    r = subprocess.run(
        [*base, f"root@127.0.0.1:{remote}", str(back)], capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 0, r.stderr
    assert back.read_text() == src.read_text() == remote.read_text()
    if legacy:
        for action in ("upload", "download"):
            ev = node.wait_event(file_event("scp", action, remote), action)
            assert ev["success"] is True and ev["user"] == "alice"
    else:
        node.wait_event(
            lambda e: e["event"] == "sftp" and e["path"] == str(remote) and e["action"] == "write", "w"
        )


# ---------------------------------------------------------------- port forwarding


@pytest.fixture
def echo_server(node: NodeHarness) -> Iterator[int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = node.call(asyncio.start_server(handle, "127.0.0.1", 0))
    yield server.sockets[0].getsockname()[1]
    node.in_loop(server.close)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _echo_through(port: int, ssh: subprocess.Popen) -> bytes:
    """Connect once the forwarding ssh is up, send a line, return what comes back."""
    deadline = time.monotonic() + 10
    while True:
        try:
            conn = socket.create_connection(("127.0.0.1", port), timeout=5)
            break
        except OSError:
            assert ssh.poll() is None and time.monotonic() < deadline, "the forwarding did not come up"
            time.sleep(0.05)
    with conn:
        conn.sendall(b"ping through the tunnel")
        got = b""
        while len(got) < 23 and (chunk := conn.recv(100)):
            got += chunk
    return got


def test_local_port_forwarding(node: NodeHarness, alice, echo_server: int) -> None:
    lport = _free_port()
    cmd = [
        "ssh", *node.ssh_opts(alice), "-p", str(node.port), "-N", "-o", "ExitOnForwardFailure=yes",
        "-L", f"127.0.0.1:{lport}:127.0.0.1:{echo_server}", "root@127.0.0.1",
    ]  # fmt: skip
    with subprocess.Popen(cmd, stderr=subprocess.PIPE) as p:
        try:
            assert _echo_through(lport, p) == b"ping through the tunnel"
        finally:
            p.terminate()
    ev = node.wait_event(lambda e: e["event"] == "port" and e["addr"] == f"127.0.0.1:{echo_server}", "port")
    assert ev["success"] is True and ev["kind"] == "local"


def test_remote_port_forwarding(node: NodeHarness, alice, echo_server: int) -> None:
    rport = _free_port()
    cmd = [
        "ssh", *node.ssh_opts(alice), "-p", str(node.port), "-N", "-o", "ExitOnForwardFailure=yes",
        "-R", f"127.0.0.1:{rport}:127.0.0.1:{echo_server}", "root@127.0.0.1",
    ]  # fmt: skip
    with subprocess.Popen(cmd, stderr=subprocess.PIPE) as p:
        try:
            assert _echo_through(rport, p) == b"ping through the tunnel"
        finally:
            p.terminate()
    ev = node.wait_event(lambda e: e["event"] == "port" and e["addr"] == f"127.0.0.1:{rport}", "port")
    assert ev["success"] is True and ev["kind"] == "remote"


def test_port_forwarding_refused_by_role(node: NodeHarness, echo_server: int) -> None:
    creds = node.creds(node.identity(roles=("noforward",)))
    r = node.ssh(creds, None, "-W", f"127.0.0.1:{echo_server}", input="x")
    assert r.returncode != 0
    assert "administratively prohibited: port forwarding is not allowed by your roles" in r.stderr
    ev = node.wait_event(
        lambda e: e["event"] == "port" and not e["success"] and e["user"] == "alice", "refused port"
    )
    assert ev["code"] == "W2007W" and ev["addr"] == f"127.0.0.1:{echo_server}"


def test_port_forwarding_needs_the_certificate_permission(node: NodeHarness, echo_server: int) -> None:
    creds = node.creds(forwarding=False)
    r = node.ssh(creds, None, "-W", f"127.0.0.1:{echo_server}", input="x")
    assert r.returncode != 0 and "Port forwarding not permitted" in r.stderr


# ---------------------------------------------------------------- agent forwarding


@pytest.fixture
def agent_sock(tmp_path: Path) -> Iterator[Path]:
    sock = tmp_path / "agent.sock"
    with subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL) as p:
        try:
            deadline = time.monotonic() + 10
            while not sock.exists():
                assert time.monotonic() < deadline, "ssh-agent did not start"
                time.sleep(0.02)
            key = tmp_path / "agent_key"
            key.write_text(ssh_private_key_openssh(generate_ssh_key()))
            key.chmod(0o600)
            env = {**os.environ, "SSH_AUTH_SOCK": str(sock)}
            subprocess.run(["ssh-add", "-q", str(key)], env=env, check=True, timeout=10, capture_output=True)
            yield sock
        finally:
            p.terminate()


def test_agent_forwarding_when_roles_allow(node: NodeHarness, agent_sock: Path) -> None:
    login = OTHER or "root"  # as a non-root login, the socket must have been handed over
    creds = node.creds(node.identity(roles=("agent",), logins=(login,)))
    env = {**os.environ, "SSH_AUTH_SOCK": str(agent_sock)}
    r = node.ssh(creds, "ssh-add -l", "-A", login=login, agent=True, env=env)
    assert r.returncode == 0 and "(ED25519)" in r.stdout, r.stderr


def test_agent_forwarding_refused_without_role_option(node: NodeHarness, alice, agent_sock: Path) -> None:
    env = {**os.environ, "SSH_AUTH_SOCK": str(agent_sock)}
    r = node.ssh(alice, 'echo "[$SSH_AUTH_SOCK]"', "-A", "-v", agent=True, env=env)
    assert "Requesting authentication agent forwarding" in r.stderr  # the client did ask
    assert r.stdout == "[]\n"


# ---------------------------------------------------------------- connections handed over


def test_serve_stream_with_the_real_client_address(node: NodeHarness, alice) -> None:
    async def handoff(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await node.service.serve_stream(reader, writer, client_addr=("203.0.113.7", 4711))

    server = node.call(asyncio.start_server(handoff, "127.0.0.1", 0))
    try:
        port = server.sockets[0].getsockname()[1]
        cmd = ["ssh", *node.ssh_opts(alice), "-p", str(port), "root@127.0.0.1", "echo via-stream"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
        assert (r.returncode, r.stdout) == (0, "via-stream\n"), r.stderr
    finally:
        node.in_loop(server.close)
    ev = node.wait_event(start_of("echo via-stream"), "session.start")
    assert ev["remote_addr"] == "203.0.113.7:4711"


def test_serve_socket(node: NodeHarness, alice) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    served: list[Any] = []

    def accept() -> None:
        conn, _ = listener.accept()
        conn.setblocking(False)
        served.append(
            asyncio.run_coroutine_threadsafe(node.service.serve_socket(conn, ("192.0.2.44", 5555)), node.loop)
        )

    t = threading.Thread(target=accept)
    t.start()
    try:
        port = listener.getsockname()[1]
        cmd = ["ssh", *node.ssh_opts(alice), "-p", str(port), "root@127.0.0.1", "echo via-socket"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
        assert (r.returncode, r.stdout) == (0, "via-socket\n"), r.stderr
    finally:
        t.join(10)
        listener.close()
    served[0].result(10)  # returns once the SSH connection is over
    ev = node.wait_event(start_of("echo via-socket"), "session.start")
    assert ev["remote_addr"] == "192.0.2.44:5555"


def test_connection_handed_over_as_an_ssh_channel(node: NodeHarness, alice, tmp_path: Path) -> None:
    """What the reverse tunnel does: another SSH connection's channel carries the client's SSH."""

    class Tunnel(asyncssh.SSHServer):
        def begin_auth(self, username: str) -> bool:
            return False

        def connection_requested(self, dest_host: str, dest_port: int, orig_host: str, orig_port: int):
            return node.service.protocol_factory(client_addr=("198.51.100.9", 2222))

    tunnel_key = asyncssh.generate_private_key("ssh-ed25519")

    async def listen() -> asyncssh.SSHAcceptor:
        return await asyncssh.listen("127.0.0.1", 0, server_factory=Tunnel, server_host_keys=[tunnel_key])

    acceptor = node.call(listen())
    try:
        tport = acceptor.sockets[0].getsockname()[1]
        kh = tmp_path / "known_hosts"
        kh.write_text(
            node.known_hosts.read_text()
            + f"[127.0.0.1]:{tport} {tunnel_key.export_public_key('openssh').decode().strip()}\n"
        )
        opts = [o.replace(str(node.known_hosts), str(kh)) for o in node.ssh_opts(alice)]
        proxy = " ".join(["ssh", *opts, "-p", str(tport), "-W", "%h:%p", "tunnel@127.0.0.1"])
        cmd = [
            "ssh",
            *opts,
            "-o",
            f"ProxyCommand={proxy}",
            "-p",
            "3022",
            "root@127.0.0.1",
            "echo via-channel",
        ]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
        assert (r.returncode, r.stdout) == (0, "via-channel\n"), r.stderr
    finally:
        node.in_loop(acceptor.close)
    ev = node.wait_event(start_of("echo via-channel"), "session.start")
    assert ev["remote_addr"] == "198.51.100.9:2222"


# ---------------------------------------------------------------- shutdown


def test_closing_the_node_ends_sessions_and_their_processes(tmp_path: Path) -> None:
    n = NodeHarness(tmp_path)
    try:
        creds = n.creds()
        cmd = ["ssh", *n.ssh_opts(creds), "-p", str(n.port), "root@127.0.0.1", "echo started; sleep 60"]
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as p:
            assert p.stdout is not None and p.stdout.readline() == "started\n"
            pids = [c.pid for c in n.service._children]
            assert len(pids) == 1
            n.call(n.service.close(), timeout=30)
            _, err = p.communicate(timeout=15)
        assert "the node is shutting down" in err
        with pytest.raises(ProcessLookupError):
            os.kill(pids[0], 0)
        end = n.wait_event(lambda e: e["event"] == "session.end", "session.end")
        assert end["reason"] == "the node is shutting down"
    finally:
        n.close()


# ---------------------------------------------------------------- labels, helpers


def test_command_labels_feed_the_node_resource(node: NodeHarness) -> None:
    assert node.node.spec.cmd_labels["arch"].result == os.uname().machine
    assert node.node.all_labels() == {"env": "test", "arch": os.uname().machine}


async def test_node_resource_from_config(tmp_path: Path) -> None:
    cfg = SSHServiceConfig(
        labels={"env": "prod"},
        commands=[
            CommandLabelConfig(name="who", command=["sh", "-c", "echo  me "], period=HOUR),
            CommandLabelConfig(name="broken", command=["/nonexistent/cmd"], period=HOUR),
            CommandLabelConfig(name="fails", command=["false"], period=HOUR),
        ],
    )
    n = node_resource(cfg, name="web-1", host_id="hid-1", addr="10.0.0.5:3022")
    assert (n.spec.hostname, n.spec.host_id, n.spec.addr) == ("web-1", "hid-1", "10.0.0.5:3022")
    labels = CommandLabels(n, cfg.commands)
    await labels.start()
    try:
        assert n.all_labels() == {"env": "prod", "who": "me", "broken": "", "fails": ""}
    finally:
        await labels.close()


def test_unprivileged_node_only_serves_its_own_user(monkeypatch: pytest.MonkeyPatch) -> None:
    from wardgate.agent.ssh.proc import LoginError, lookup_login

    assert lookup_login("root").uid == 0
    monkeypatch.setattr(os, "geteuid", lambda: 65534)
    with pytest.raises(LoginError, match='not root, so it can only open sessions as "nobody", not "root"'):
        lookup_login("root")
    assert lookup_login("nobody").uid == 65534
    with pytest.raises(LoginError, match='login "ghost-user-x" does not exist on this host'):
        lookup_login("ghost-user-x")


def test_env_allow_and_scp_parsing() -> None:
    pats = ("LANG", "LC_*", "WARD_*")
    assert env_allowed("LC_TIME", pats) and env_allowed("WARD_X", pats) and env_allowed("LANG", pats)
    assert (
        not env_allowed("LD_PRELOAD", pats)
        and not env_allowed("PATH", pats)
        and not env_allowed("lang", pats)
    )
    assert scp_request("scp -t -- /tmp/x") == ("upload", "/tmp/x")
    assert scp_request("scp -r -p -f '/tmp/a b'") == ("download", "/tmp/a b")
    assert scp_request("scp -v -d -t /srv") == ("upload", "/srv")
    assert scp_request("echo scp -t") is None and scp_request("scp") is None


def test_sftp_watcher_handles_split_packets() -> None:
    ops: list[SftpOp] = []
    w = SftpWatcher(ops.append)

    def pkt(kind: int, body: bytes) -> bytes:
        payload = bytes([kind]) + body
        return len(payload).to_bytes(4, "big") + payload

    def s(b: bytes) -> bytes:
        return len(b).to_bytes(4, "big") + b

    u32 = lambda n: n.to_bytes(4, "big")  # noqa: E731
    client = (
        pkt(3, u32(1) + s(b"/etc/passwd") + u32(1) + u32(0))  # open for read
        + pkt(6, u32(2) + s(b"h") + b"\0" * 8 + s(b"x" * 70000))  # a big WRITE, skipped
        + pkt(18, u32(3) + s(b"/a") + s(b"/b"))  # rename
    )
    server = pkt(102, u32(1) + s(b"h")) + pkt(101, u32(3) + u32(2) + s(b"No such file") + s(b""))
    for i in range(0, len(client), 7):
        w.client_data(client[i : i + 7])
    for i in range(0, len(server), 3):
        w.server_data(server[i : i + 3])
    assert ops == [
        SftpOp("read", "/etc/passwd"),
        SftpOp("rename", "/a", "/b", False, "No such file"),
    ]


async def test_registry_fan_out_and_slow_observer() -> None:
    typed: list[bytes] = []
    reg = SessionRegistry()
    live = LiveSession(sid="s1", user="alice", login="root", server_id="n", input_sink=typed.append)
    reg.add(live)
    obs = reg.join("s1", "bob")
    peer = reg.join("s1", "carol", "peer")
    assert (await obs.next_event()).kind == "r"
    live.broadcast(b"hello")
    assert (await obs.next_event()).data == b"hello"
    peer.write(b"ls\r")
    assert typed == [b"ls\r"]
    with pytest.raises(PermissionError):
        obs.write(b"x")
    peer.leave()
    assert peer.closed and peer.id not in live.participants
    slow = reg.join("s1", "dave")
    big = b"x" * (MAX_BACKLOG // 2 + 1)
    live.broadcast(big)
    assert (await obs.next_event()).data == big  # bob keeps up; dave does not read
    live.broadcast(big)
    assert slow.closed and "too slow" in slow.reason
    assert "dave" in live.history and slow.id not in live.participants and not obs.closed
    reg.remove("s1")
    events = [ev async for ev in obs]
    assert [e.kind for e in events] == ["o"] and events[0].data == big
    assert obs.closed and obs.reason == "session ended"
    with pytest.raises(KeyError, match="no live session s1"):
        reg.join("s1", "erin")
    assert live.history == ["alice", "bob", "carol", "dave"]
