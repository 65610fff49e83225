"""Agentless OpenSSH nodes end to end: a real `wardgate start`, a real sshd, `ward` and OpenSSH.

With `record_session` (the default) the proxy terminates SSH, records and logs in to sshd with a
certificate auth issues to it for the user; with `record_session: false` it relays bytes.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pexpect
import pytest

from tests.cluster import (
    BIN,
    CLUSTER,
    SSHCluster,
    audit,
    free_port,
    login,
    openssh_server,
    ward,
    ward_env,
    wardctl,
)

ROLES = """kind: role
metadata: {name: web-only}
spec:
  allow:
    logins: [www]
    node_labels: {env: web}
---
kind: role
metadata: {name: relay}
spec:
  options: {record_session: false}
  allow:
    logins: [root]
    node_labels: {'*': '*'}
---
kind: role
metadata: {name: relay-web}
spec:
  options: {record_session: false}
  allow:
    logins: [www]
    node_labels: {env: web}
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SSHCluster]:
    c = SSHCluster(tmp_path_factory.mktemp("agentless-cluster"))
    wardctl(c.data_dir, "create", "-f", "-", stdin=ROLES)
    yield c
    c.stop()


@pytest.fixture(scope="module")
def legacy(cluster: SSHCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """An OpenSSH server registered as the agentless node `legacy`; yields sshd's port."""
    with openssh_server(cluster, tmp_path_factory.mktemp("sshd")) as port:
        wardctl(cluster.data_dir, "nodes", "add", "--agentless", "--name=legacy",
                f"--addr=127.0.0.1:{port}", "--labels=env=dev,kind=openssh")  # fmt: skip
        yield port


@pytest.fixture(scope="module")
def user(cluster: SSHCluster, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, str], Path]:
    """`user(name, roles)`: invite, register and `ward login` once; returns the ward home."""
    homes: dict[str, Path] = {}

    def get(name: str, roles: str) -> Path:
        if name not in homes:
            home = tmp_path_factory.mktemp(f"{name}-ward")
            login(cluster, home, name, cluster.add_user(name, roles, "root"))
            homes[name] = home
        return homes[name]

    return get


def wait_for(what: Callable[[], list[dict]], timeout: float = 20) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        found = what()
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def events(cluster: SSHCluster, kind: str, **match: object) -> list[dict]:
    return [
        e for e in audit(cluster.data_dir, "--type", kind) if all(e.get(k) == v for k, v in match.items())
    ]


def test_exec_output_exit_code_and_audit(cluster: SSHCluster, legacy: int, user: Callable) -> None:
    alice = user("alice", "access")
    out = ward(alice, "ssh", "root@legacy", "echo", "agentless-ok;", "echo", "to-stderr", ">&2")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "agentless-ok"
    assert "to-stderr" in out.stderr
    assert ward(alice, "ssh", "root@legacy", "exit 7").returncode == 7

    execs = wait_for(lambda: events(cluster, "exec", user="alice", exit_code=7))
    assert execs and execs[0]["command"] == "exit 7" and execs[0]["agentless"] is True
    ends = wait_for(lambda: events(cluster, "session.end", user="alice", server_id="legacy"))
    assert ends and all(e["agentless"] is True for e in ends)
    assert any(e["bytes_out"] > 0 and e["login"] == "root" for e in ends)
    # The proxy logged in to sshd with a certificate auth issued to it, for that login only.
    certs = events(cluster, "cert.create", user="alice", node="legacy")
    assert certs and certs[0]["logins"] == ["root"] and certs[0]["impersonator"].startswith("proxy-")


def test_interactive_session_is_recorded_at_the_proxy(
    cluster: SSHCluster, legacy: int, user: Callable
) -> None:
    alice = user("alice", "access")
    child = pexpect.spawn(
        str(BIN / "ward"),
        ["ssh", "-t", "root@legacy"],
        env=ward_env(alice),
        encoding="utf-8",
        timeout=30,
        dimensions=(30, 100),
    )
    child.sendline("echo marker-$((6*7))-done; stty size")
    child.expect("marker-42-done")
    child.expect("30 100")  # pty-req carried the terminal size to sshd
    child.setwinsize(40, 120)
    child.sendline("echo size=$(stty size)=")
    child.expect("size=40 120=")  # and so did window-change
    child.sendline("exit 3")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 3

    ends = wait_for(lambda: events(cluster, "session.end", user="alice", server_id="legacy", recorded=True))
    assert ends and ends[0]["interactive"] is True and ends[0]["exit_code"] == 3
    sid = ends[0]["sid"]

    def uploaded() -> list[dict]:
        recs = json.loads(wardctl(cluster.data_dir, "recordings", "ls", "--format", "json").stdout)
        return [r for r in recs if r["sid"] == sid]

    assert wait_for(uploaded, 30), "the proxy did not upload the recording"
    text = ward(alice, "play", sid, "--format", "text")
    assert text.returncode == 0 and "marker-42-done" in text.stdout
    starts = events(cluster, "session.start", sid=sid)
    assert starts and starts[0]["terminal_size"] == "100x30" and starts[0]["agentless"] is True


def test_sftp_and_scp_through_ward_config(
    cluster: SSHCluster, legacy: int, user: Callable, tmp_path: Path
) -> None:
    alice = user("alice", "access")
    cfg = tmp_path / "ssh_config"
    cfg.write_text(ward(alice, "config").stdout)
    base = ["-F", str(cfg), "-o", "BatchMode=yes"]
    src = tmp_path / "payload.bin"
    src.write_bytes(os.urandom(300_000))
    remote = f"/tmp/wardgate-agentless-{os.getpid()}.bin"
    batch = tmp_path / "batch"
    back = tmp_path / "back.bin"
    batch.write_text(f"put {src} {remote}\nget {remote} {back}\nrm {remote}\n")
    sftp = subprocess.run(
        ["sftp", *base, "-b", str(batch), f"root@legacy.{CLUSTER}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert sftp.returncode == 0, sftp.stderr
    assert back.read_bytes() == src.read_bytes()
    ops = wait_for(lambda: events(cluster, "sftp", user="alice", path=remote))
    assert {"write", "read", "remove"} <= {e["action"] for e in ops}

    copied = tmp_path / "copied.bin"
    scp = subprocess.run(
        ["scp", *base, str(src), f"root@legacy.{CLUSTER}:{remote}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert scp.returncode == 0, scp.stderr
    scp = subprocess.run(
        ["scp", *base, f"root@legacy.{CLUSTER}:{remote}", str(copied)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert scp.returncode == 0, scp.stderr
    assert copied.read_bytes() == src.read_bytes()
    ward(alice, "ssh", "root@legacy", "rm", "-f", remote)


def test_local_port_forwarding(cluster: SSHCluster, legacy: int, user: Callable) -> None:
    alice = user("alice", "access")
    local = free_port()
    fwd = subprocess.Popen(
        [str(BIN / "ward"), "ssh", "-N", "-L", f"{local}:127.0.0.1:{legacy}", "root@legacy"],
        env=ward_env(alice),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        banner = b""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not banner.startswith(b"SSH-2.0-"):
            try:
                with socket.create_connection(("127.0.0.1", local), timeout=5) as s:
                    banner = s.recv(64)
            except OSError:
                time.sleep(0.2)
        assert banner.startswith(b"SSH-2.0-OpenSSH"), banner  # sshd itself, reached through -L
    finally:
        fwd.terminate()
        fwd.wait(10)
    ports = wait_for(lambda: events(cluster, "port", user="alice", addr=f"127.0.0.1:{legacy}"))
    assert ports and ports[0]["success"] is True and ports[0]["agentless"] is True


def test_only_the_login_used_must_be_allowed_and_it_is_checked_inside_ssh(
    cluster: SSHCluster, legacy: int, user: Callable, tmp_path: Path
) -> None:
    # dora's certificate carries www (allowed only on env=web) as well as root: the relay had to
    # refuse her on legacy; terminating SSH, the proxy sees the login and decides for it alone.
    dora = user("dora", "access,web-only")
    ok = ward(dora, "ssh", "root@legacy", "echo", "root-ok")
    assert ok.returncode == 0 and ok.stdout.strip() == "root-ok", ok.stderr
    refused = ward(dora, "ssh", "www@legacy", "true")
    assert refused.returncode != 0 and 'login "www"' in refused.stderr

    # A client that names root in the ward-ssh request but logs in as www inside SSH: the
    # proxy's SSH server refuses www with a banner, though www is in the certificate.
    cfg = ward(dora, "config").stdout.replace("%r@%h:%p", "root@%h:%p")
    (tmp_path / "ssh_config").write_text(cfg)
    sneaky = subprocess.run(
        ["ssh", "-F", str(tmp_path / "ssh_config"), "-o", "BatchMode=yes", f"www@legacy.{CLUSTER}", "true"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert sneaky.returncode == 255
    assert "wardgate: access denied" in sneaky.stderr and 'login "www"' in sneaky.stderr
    refusals = wait_for(lambda: events(cluster, "auth", user="dora", login="www", agentless=True))
    assert refusals and refusals[0]["success"] is False and refusals[0]["component"] == "proxy"
    assert not events(cluster, "cert.create", user="dora", logins=["www"])

    # Someone else's SSH certificate inside dora's TLS connection is refused too.
    alice_keys = {
        line.split()[0]: line
        for line in ward(user("alice", "access"), "config").stdout.splitlines()
        if line.split()[:1] in (["IdentityFile"], ["CertificateFile"])
    }
    mixed = "\n".join(
        alice_keys.get(line.split()[0], line) if line.split() else line for line in cfg.splitlines()
    )
    (tmp_path / "ssh_config").write_text(mixed.replace("root@%h:%p", "%r@%h:%p") + "\n")
    swapped = subprocess.run(
        ["ssh", "-F", str(tmp_path / "ssh_config"), "-o", "BatchMode=yes", f"root@legacy.{CLUSTER}", "true"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert swapped.returncode == 255 and "is alice's but the TLS certificate is dora's" in swapped.stderr


def test_record_session_false_keeps_the_byte_relay(cluster: SSHCluster, legacy: int, user: Callable) -> None:
    rita = user("rita", "relay")
    out = ward(rita, "ssh", "root@legacy", "echo", "relayed")
    assert out.returncode == 0 and out.stdout.strip() == "relayed", out.stderr
    ends = wait_for(lambda: events(cluster, "session.end", user="rita", server_id="legacy"))
    assert ends and ends[0]["agentless"] is True and ends[0]["bytes_out"] > 0
    assert "session_type" not in ends[0]  # written by the relay, not by a terminated session
    assert not events(cluster, "cert.create", user="rita", node="legacy")

    # Relaying, the proxy cannot see the login: every login in the certificate must be allowed.
    walt = user("walt", "relay,relay-web")
    refused = ward(walt, "ssh", "root@legacy", "true")
    assert refused.returncode != 0 and "agentless" in refused.stderr and "www" in refused.stderr
