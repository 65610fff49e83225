"""SSH end to end: a real `wardgate start` (auth + proxy + node), the real `ward` and OpenSSH.

Also a second process that joins with a token through the proxy and serves its node over a
reverse tunnel (it listens on nothing: the only way in is the tunnel). Agentless OpenSSH nodes
have their own file, `test_e2e_agentless.py`.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pexpect
import pytest

from tests.cluster import (
    BIN,
    CLUSTER,
    STATIC_TOKEN,
    Process,
    SSHCluster,
    audit,
    current_code,
    login,
    ward,
    ward_env,
    wardctl,
)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SSHCluster]:
    c = SSHCluster(tmp_path_factory.mktemp("ssh-cluster"))
    yield c
    c.stop()


@pytest.fixture(scope="module")
def alice(cluster: SSHCluster, tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("alice-ward")
    login(cluster, home, "alice", cluster.add_user("alice", "access", "root"))
    return home


def test_default_start_runs_all_three_services(cluster: SSHCluster) -> None:
    out = cluster.output()
    assert "services        auth, proxy, ssh" in out
    assert f"ward login --proxy={cluster.proxy}" in out


def test_status_and_ls(cluster: SSHCluster, alice: Path) -> None:
    status = ward(alice, "status")
    assert status.returncode == 0 and "alice" in status.stdout and CLUSTER in status.stdout
    ls = ward(alice, "ls")
    assert ls.returncode == 0, ls.stderr
    assert re.search(r"main-node\s+.*env=dev\s+root", ls.stdout), ls.stdout
    data = json.loads(ward(alice, "ls", "--format", "json").stdout)
    assert [n["name"] for n in data] == ["main-node"]
    assert ward(alice, "ls", "env=prod").stdout.count("main-node") == 0


def test_ssh_exec_and_exit_code(cluster: SSHCluster, alice: Path) -> None:
    hi = ward(alice, "ssh", "root@main-node", "echo", "hi-from-$(hostname)")
    assert hi.returncode == 0, hi.stderr
    assert hi.stdout.strip() == f"hi-from-{socket.gethostname()}"
    assert ward(alice, "ssh", "root@main-node", "exit 7").returncode == 7
    starts = [e for e in audit(cluster.data_dir, "--type", "session.start") if e["user"] == "alice"]
    assert starts and starts[0]["login"] == "root"


def test_interactive_session_is_recorded_and_replays(cluster: SSHCluster, alice: Path) -> None:
    child = pexpect.spawn(
        str(BIN / "ward"),
        ["ssh", "-t", "root@main-node"],
        env=ward_env(alice),
        encoding="utf-8",
        timeout=30,
        dimensions=(30, 100),
    )
    child.sendline("echo marker-$((6*7))-done")
    child.expect("marker-42-done")
    child.sendline("exit 0")
    child.expect(pexpect.EOF)
    child.close()
    sid = ""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not sid:
        recs = json.loads(wardctl(cluster.data_dir, "recordings", "ls", "--format", "json").stdout)
        sid = next((r["sid"] for r in recs if r["user"] == "alice"), "")
        time.sleep(0.3)
    assert sid, "the recording was not uploaded"
    text = ward(alice, "play", sid, "--format", "text")
    assert text.returncode == 0 and "marker-42-done" in text.stdout
    events = json.loads(ward(alice, "play", sid, "--format", "json").stdout)
    assert events["header"]["version"] == 2
    played = ward(alice, "play", sid, "--speed", "50")
    assert "marker-42-done" in played.stdout
    ends = [e for e in audit(cluster.data_dir, "--type", "session.end") if e.get("sid") == sid]
    assert ends and ends[0]["user"] == "alice"


def test_plain_openssh_scp_and_sftp_through_ward_config(
    cluster: SSHCluster, alice: Path, tmp_path: Path
) -> None:
    cfg = tmp_path / "ssh_config"
    cfg.write_text(ward(alice, "config").stdout)
    base = ["-F", str(cfg), "-o", "BatchMode=yes"]
    ok = subprocess.run(
        ["ssh", *base, f"root@main-node.{CLUSTER}", "echo", "openssh-ok"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == "openssh-ok"
    src = tmp_path / "payload.bin"
    src.write_bytes(os.urandom(300_000))
    remote = f"/tmp/wardgate-e2e-{os.getpid()}.bin"
    up = subprocess.run(
        ["scp", *base, str(src), f"root@main-node.{CLUSTER}:{remote}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert up.returncode == 0, up.stderr
    back = tmp_path / "back.bin"
    batch = tmp_path / "batch"
    batch.write_text(f"get {remote} {back}\nrm {remote}\n")
    sftp = subprocess.run(
        ["sftp", *base, "-b", str(batch), f"root@main-node.{CLUSTER}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert sftp.returncode == 0, sftp.stderr
    assert back.read_bytes() == src.read_bytes()


def test_denied_login_and_locked_user_are_refused_and_audited(
    cluster: SSHCluster, tmp_path_factory: pytest.TempPathFactory
) -> None:
    home = tmp_path_factory.mktemp("bob-ward")
    login(cluster, home, "bob", cluster.add_user("bob", "access", "root"))
    denied = ward(home, "ssh", "nobody@main-node", "true")
    assert denied.returncode != 0
    assert 'login "nobody"' in denied.stderr
    wardctl(cluster.data_dir, "lock", "--user=bob", "--ttl=1h", "--message=incident-77")
    locked = ward(home, "ssh", "root@main-node", "true")
    assert locked.returncode != 0 and "incident-77" in locked.stderr
    refusals = [
        e for e in audit(cluster.data_dir, "--type", "auth") if e["user"] == "bob" and not e["success"]
    ]
    reasons = " ".join(e.get("error", "") for e in refusals)
    assert 'login "nobody"' in reasons and "incident-77" in reasons


def test_garbage_on_the_proxy_port_leaves_it_serving(cluster: SSHCluster, alice: Path) -> None:
    for payload in (os.urandom(2048), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\x16\x03\x01\x02\x00\x01"):
        with socket.create_connection(("127.0.0.1", cluster.proxy_port), timeout=5) as s:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            s.settimeout(5)
            try:
                reply = s.recv(1024)
            except (ConnectionResetError, TimeoutError):
                reply = b""
            if payload.startswith(b"GET"):
                assert b"400" in reply and b"https://" in reply
    assert ward(alice, "ssh", "root@main-node", "echo", "still-up").stdout.strip() == "still-up"


def test_node_behind_a_reverse_tunnel(cluster: SSHCluster, alice: Path, tmp_path: Path) -> None:
    """A node that only dials out: joined with a token through the proxy's one port."""
    edge_data = tmp_path / "edge-data"
    edge = Process(
        tmp_path / "edge",
        f"""version: v1
wardgate:
  nodename: edge-node
  data_dir: {edge_data}
  proxy_server: {cluster.proxy}
  auth_token: {STATIC_TOKEN.split(":", 1)[1]}
  ca_pin: ["{cluster.pin}"]
auth_service:
  enabled: false
proxy_service:
  enabled: false
ssh_service:
  listen_addr: 127.0.0.1:0
  labels: {{env: edge}}
""",
    )
    try:
        assert "reverse tunnel to" in edge.output()
        deadline = time.monotonic() + 30
        ls = ""
        while time.monotonic() < deadline and "edge-node" not in ls:
            ls = ward(alice, "ls", "env=edge").stdout
            time.sleep(0.3)
        assert "edge-node" in ls
        out = ward(alice, "ssh", "root@edge-node", "echo", "through-the-tunnel")
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "through-the-tunnel"
        joins = [e for e in audit(cluster.data_dir, "--type", "join") if e["user"] == "edge-node"]
        assert joins and joins[0]["success"]

        # The proxy restarts: the agent reconnects by itself and new sessions work again.
        cluster.stop()
        cluster.start()
        deadline = time.monotonic() + 60
        again = None
        while time.monotonic() < deadline:
            again = ward(alice, "ssh", "root@edge-node", "echo", "after-restart")
            if again.returncode == 0:
                break
            time.sleep(0.5)
        assert again is not None and again.stdout.strip() == "after-restart", again and again.stderr
        assert "retrying" in edge.output() or "reconnect" in edge.output().lower()
    finally:
        edge.stop()


def test_join_a_live_session_as_observer(
    cluster: SSHCluster, alice: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    role = "kind: role\nmetadata: {name: watcher}\nspec:\n  allow:\n    join_sessions: [observer]\n"
    wardctl(cluster.data_dir, "create", "-f", "-", stdin=role)
    erin = tmp_path_factory.mktemp("erin-ward")
    login(cluster, erin, "erin", cluster.add_user("erin", "access,watcher", "root"))
    frank = tmp_path_factory.mktemp("frank-ward")
    login(cluster, frank, "frank", cluster.add_user("frank", "access", "root"))

    owner = pexpect.spawn(
        str(BIN / "ward"),
        ["ssh", "-t", "root@main-node"],
        env=ward_env(alice),
        encoding="utf-8",
        timeout=30,
        dimensions=(30, 100),
    )
    owner.sendline("echo sid=$WARD_SESSION_ID=")
    owner.expect(r"sid=([0-9a-f-]{36})=")
    sid = owner.match.group(1)

    refused = ward(frank, "join", sid)
    assert refused.returncode != 0 and "join_sessions" in refused.stderr

    watcher = pexpect.spawn(
        str(BIN / "ward"), ["join", sid], env=ward_env(erin), encoding="utf-8", timeout=30
    )
    watcher.expect("Joining alice's session")
    time.sleep(0.5)  # let the join reach the node before the owner types
    owner.sendline("echo shared-$((40+2))-view")
    owner.expect("shared-42-view")
    watcher.expect("shared-42-view")
    watcher.send("echo typed-by-observer\r")  # observers cannot type into the session
    owner.sendline("exit 0")
    owner.expect(pexpect.EOF)
    watcher.expect(pexpect.EOF)
    assert "typed-by-observer" not in owner.before
    joins = [e for e in audit(cluster.data_dir, "--type", "session.join") if e.get("sid") == sid]
    assert any(e["user"] == "erin" and e["success"] and e["mode"] == "observer" for e in joins)
    assert any(e["user"] == "frank" and not e["success"] for e in joins)
    ends = [e for e in audit(cluster.data_dir, "--type", "session.end") if e.get("sid") == sid]
    assert ends and "erin" in ends[0]["participants"]


def test_ward_scp_both_ways(cluster: SSHCluster, alice: Path, tmp_path: Path) -> None:
    src = tmp_path / "up.bin"
    src.write_bytes(os.urandom(200_000))
    remote = f"/tmp/ward-scp-{os.getpid()}.bin"
    up = ward(alice, "scp", str(src), f"root@main-node:{remote}")
    assert up.returncode == 0, up.stderr
    down = tmp_path / "down.bin"
    back = ward(alice, "scp", f"root@main-node:{remote}", str(down))
    assert back.returncode == 0, back.stderr
    assert down.read_bytes() == src.read_bytes()
    ward(alice, "ssh", "root@main-node", "rm", "-f", remote)


def test_per_session_mfa_asks_for_a_code_each_session(
    cluster: SSHCluster, tmp_path_factory: pytest.TempPathFactory
) -> None:
    role = (
        "kind: role\nmetadata: {name: mfa-always}\nspec:\n  options: {require_session_mfa: true}\n"
        "  allow:\n    logins: [root]\n    node_labels: {'*': '*'}\n"
    )
    wardctl(cluster.data_dir, "create", "-f", "-", stdin=role)
    home = tmp_path_factory.mktemp("mia-ward")
    secret = cluster.add_user("mia", "mfa-always", "root")
    login(cluster, home, "mia", secret)  # spends the current step

    wrong = pexpect.spawn(
        str(BIN / "ward"), ["ssh", "root@main-node", "true"], env=ward_env(home), encoding="utf-8", timeout=30
    )
    wrong.expect("require MFA for each session")
    wrong.sendline("000000" if current_code(secret) != "000000" else "111111")
    wrong.expect(pexpect.EOF)
    wrong.close()
    assert wrong.exitstatus != 0 and "one-time code" in wrong.before

    child = pexpect.spawn(
        str(BIN / "ward"),
        ["ssh", "root@main-node", "echo", "mfa-$((40+2))"],
        env=ward_env(home),
        encoding="utf-8",
        timeout=30,
    )
    child.expect("require MFA for each session")
    child.sendline(current_code(secret, time.time() + 30))  # the step after the login's
    child.expect("mfa-42")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    starts = [e for e in audit(cluster.data_dir, "--type", "session.start") if e["user"] == "mia"]
    assert starts and starts[0]["success"]
    mfa = [e for e in audit(cluster.data_dir, "--type", "mfa.verify") if e["user"] == "mia"]
    assert mfa and mfa[0]["success"]
