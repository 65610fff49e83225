"""`wardgate start` as a real process, driven by the real `wardctl` and `ward` commands."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pexpect
import pytest

from tests.cluster import BIN, Process, free_port, wardctl
from wardgate.auth.totp import current_code


class Cluster(Process):
    def __init__(self, root: Path) -> None:
        self.data_dir = root / "data"
        self.port = free_port()
        self.addr = f"127.0.0.1:{self.port}"
        super().__init__(
            root,
            f"""version: v1
wardgate:
  nodename: e2e-host
  data_dir: {self.data_dir}
auth_service:
  enabled: true
  listen_addr: {self.addr}
  cluster_name: e2e.example
  tokens: ["node:static-token-for-e2e-tests"]
proxy_service:
  enabled: false
ssh_service:
  enabled: false
""",
            wait_for=self.data_dir / "admin.identity",
            wait_ports=(self.port,),
        )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("cluster"))
    yield c
    c.stop()


def test_start_prints_next_steps_and_keeps_identity_private(cluster: Cluster) -> None:
    out = cluster.output()
    assert "cluster e2e.example is up" in out
    assert "wardctl" in out and "users add" in out
    assert oct((cluster.data_dir / "admin.identity").stat().st_mode & 0o777) == "0o600"


def test_status_shows_cluster_and_ca_pins(cluster: Cluster) -> None:
    out = wardctl(cluster.data_dir, "status").stdout
    assert "e2e.example" in out and "sha256:" in out and "SHA256:" in out
    data = json.loads(wardctl(cluster.data_dir, "status", "--format", "json").stdout)
    assert {ca["type"] for ca in data["cas"]} == {"user", "host", "db", "jwt"}


def test_roles_from_yaml_and_errors_that_name_the_line(cluster: Cluster, tmp_path: Path) -> None:
    good = tmp_path / "dev.yaml"
    good.write_text(
        "kind: role\nversion: v1\nmetadata:\n  name: dev\nspec:\n  allow:\n    logins: [dev]\n"
        "    node_labels:\n      env: ['dev', '^stag.*$']\n  deny:\n    logins: [root]\n"
    )
    assert 'role "dev" has been created' in wardctl(cluster.data_dir, "create", "-f", str(good)).stdout
    again = wardctl(cluster.data_dir, "create", "-f", str(good), check=False)
    assert again.returncode == 1 and "already exists" in again.stderr and "--force" in again.stderr
    wardctl(cluster.data_dir, "create", "-f", str(good), "--force")
    got = wardctl(cluster.data_dir, "get", "role/dev").stdout
    assert "^stag.*$" in got and "kind: role" in got

    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: role\nmetadata:\n  name: broken\nspec:\n  allow:\n    logins: root\n")
    err = wardctl(cluster.data_dir, "create", "-f", str(bad), check=False)
    assert err.returncode == 1
    assert f"{bad}:6: spec.allow.logins" in err.stderr
    unknown = wardctl(
        cluster.data_dir, "create", "-f", "-", stdin="kind: gizmo\nmetadata: {name: x}\n", check=False
    )
    assert "unknown kind" in unknown.stderr and "role" in unknown.stderr
    broken = wardctl(cluster.data_dir, "create", "-f", "-", stdin="kind: role\n  metadata: [\n", check=False)
    assert broken.returncode == 1 and "<stdin>:" in broken.stderr
    assert "Traceback" not in broken.stderr + err.stderr + unknown.stderr


def test_invite_register_in_a_terminal_and_lockout(cluster: Cluster) -> None:
    out = wardctl(
        cluster.data_dir, "users", "add", "alice", "--roles=access,dev", "--logins=root,alice"
    ).stdout
    token = out.split("--invite=")[1].split()[0]
    pin = json.loads(wardctl(cluster.data_dir, "status", "--format", "json").stdout)["ca_pin"]

    child = pexpect.spawn(
        str(BIN / "ward"),
        ["register", f"--proxy={cluster.addr}", f"--invite={token}", f"--ca-pin={pin}"],
        encoding="utf-8",
        timeout=30,
        env={**os.environ, "COLUMNS": "200"},
    )
    child.expect(r"Welcome, \S*alice")
    child.expect("Password:")
    child.sendline("short")
    child.expect("Confirm password:")
    child.sendline("short")
    child.expect("too short")
    child.expect("Password:")
    child.sendline("a long enough passphrase")
    child.expect("Confirm password:")
    child.sendline("a long enough passphrase")
    child.expect(r"Secret: ([A-Z2-7]+)")
    secret = child.match.group(1)
    child.expect("6-digit code")
    child.sendline(current_code(secret))
    child.expect("is registered with roles access, dev")
    child.expect(pexpect.EOF)

    users = wardctl(cluster.data_dir, "users", "ls").stdout
    assert "alice" in users and "active" in users and "otp" in users

    # A wrong pin is refused before any secret is sent.
    bad = subprocess.run(
        [
            str(BIN / "ward"),
            "register",
            f"--proxy={cluster.addr}",
            "--invite=x",
            "--ca-pin=sha256:" + "0" * 64,
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert bad.returncode == 1 and "does not match --ca-pin" in bad.stderr

    events = json.loads(
        wardctl(cluster.data_dir, "audit", "search", "--type", "user.register", "--format", "json").stdout
    )
    assert events[0]["user"] == "alice" and events[0]["success"] is True


def test_tokens_lifecycle_and_join_refusals(cluster: Cluster) -> None:
    out = wardctl(cluster.data_dir, "tokens", "add", "--type=node,db", "--ttl=5m").stdout
    assert "The invite token:" in out and "node,db" in out
    ls = wardctl(cluster.data_dir, "tokens", "ls", "--format", "json").stdout
    tokens = json.loads(ls)
    assert len(tokens) == 1 and tokens[0]["spec"]["token_hash"] == ""
    bad_type = wardctl(cluster.data_dir, "tokens", "add", "--type=cheese", check=False)
    assert "invalid token type cheese" in bad_type.stderr
    wardctl(cluster.data_dir, "tokens", "rm", tokens[0]["metadata"]["name"])
    assert "No tokens" in wardctl(cluster.data_dir, "tokens", "ls").stdout


def test_lock_explain_and_audit(cluster: Cluster) -> None:
    wardctl(cluster.data_dir, "users", "add", "bob", "--roles=dev", "--logins=dev")
    node = "kind: node\nmetadata:\n  name: web1\n  labels: {env: dev}\nspec:\n  hostname: web1\n"
    wardctl(cluster.data_dir, "create", "-f", "-", stdin=node)
    ok = wardctl(cluster.data_dir, "access", "explain", "--user", "bob", "node/web1", "--login", "dev")
    assert "ALLOWED" in ok.stdout and 'role "dev"' in ok.stdout
    denied = wardctl(
        cluster.data_dir, "access", "explain", "--user", "bob", "node/web1", "--login", "root", check=False
    )
    assert denied.returncode == 2 and "DENIED" in denied.stdout
    lock = wardctl(cluster.data_dir, "lock", "--user=bob", "--ttl=1h", "--message=offboarding").stdout
    assert "Created lock" in lock
    locked = wardctl(
        cluster.data_dir, "access", "explain", "--user", "bob", "node/web1", "--login", "dev", check=False
    )
    assert locked.returncode == 2 and "offboarding" in locked.stdout
    events = json.loads(
        wardctl(cluster.data_dir, "audit", "search", "--type", "lock.create", "--format", "json").stdout
    )
    assert events[0]["message"] == "offboarding"
    table = wardctl(cluster.data_dir, "audit", "search", "--since", "10m").stdout
    assert "lock.create" in table and "W1400I" in table


def test_export_and_sign_for_openssh(cluster: Cluster, tmp_path: Path) -> None:
    user_ca = wardctl(cluster.data_dir, "auth", "export", "--type=user").stdout.strip()
    assert user_ca.startswith("ssh-ed25519 ") and user_ca.endswith("wardgate-user-ca@e2e.example")
    host_ca = wardctl(cluster.data_dir, "auth", "export", "--type=host").stdout.strip()
    assert host_ca.startswith("@cert-authority * ssh-ed25519 ")
    key = tmp_path / "hostkey"
    wardctl(
        cluster.data_dir, "auth", "sign", "--host=db1", "--principals=db1.internal,10.0.0.5", "-o", str(key)
    )
    listing = subprocess.run(
        ["ssh-keygen", "-L", "-f", f"{key}-cert.pub"], capture_output=True, text=True, check=True
    ).stdout
    assert "host certificate" in listing and "db1.internal" in listing and "10.0.0.5" in listing
    # ssh-keygen accepts the private key we wrote (OpenSSH format, 0600).
    subprocess.run(["ssh-keygen", "-y", "-f", str(key)], capture_output=True, check=True)

    wardctl(cluster.data_dir, "users", "add", "ci-bot", "--roles=editor")
    ident = tmp_path / "bot.identity"
    wardctl(cluster.data_dir, "auth", "sign", "--user=ci-bot", "--ttl=1h", "-o", str(ident))
    ls = subprocess.run(
        [str(BIN / "wardctl"), "-i", str(ident), "users", "ls"], capture_output=True, text=True, timeout=60
    )
    assert ls.returncode == 0 and "ci-bot" in ls.stdout


def test_access_role_cannot_administer(cluster: Cluster, tmp_path: Path) -> None:
    wardctl(cluster.data_dir, "users", "add", "viewer", "--roles=access")
    ident = tmp_path / "viewer.identity"
    wardctl(cluster.data_dir, "auth", "sign", "--user=viewer", "--ttl=1h", "-o", str(ident))
    denied = subprocess.run(
        [str(BIN / "wardctl"), "-i", str(ident), "tokens", "add", "--type=node"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert denied.returncode == 1 and "ERROR:" in denied.stderr and "token" in denied.stderr


def test_expired_certificate_is_refused_clearly(cluster: Cluster, tmp_path: Path) -> None:
    wardctl(cluster.data_dir, "users", "add", "short-lived", "--roles=editor")
    ident = tmp_path / "short.identity"
    wardctl(cluster.data_dir, "auth", "sign", "--user=short-lived", "--ttl=1s", "-o", str(ident))
    time.sleep(1.5)
    out = subprocess.run(
        [str(BIN / "wardctl"), "-i", str(ident), "users", "ls"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 1 and "expired" in out.stderr


def test_garbage_on_the_auth_port_leaves_it_serving(cluster: Cluster) -> None:
    for payload in (
        b"\x16\x03\x01\x00\xff" + os.urandom(64),
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        os.urandom(4096),
    ):
        with socket.create_connection(("127.0.0.1", cluster.port), timeout=5) as s:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            s.settimeout(5)
            with contextlib.suppress(ConnectionResetError, TimeoutError):
                s.recv(1024)
    # A connection with no client certificate may ping, but nothing else.
    import ssl
    import urllib.request

    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with urllib.request.urlopen(f"https://{cluster.addr}/v1/ping", context=ctx, timeout=10) as r:
        assert json.load(r)["cluster_name"] == "e2e.example"
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"https://{cluster.addr}/v1/resources/role", context=ctx, timeout=10)
    assert refused.value.code == 401
    assert "client certificate" in json.load(refused.value)["error"]["message"]
    assert "e2e.example" in wardctl(cluster.data_dir, "status").stdout
    assert cluster.proc.poll() is None


async def test_join_over_the_api_with_good_and_bad_tokens(cluster: Cluster) -> None:
    from wardgate.api.client import AuthClient
    from wardgate.api.identityfile import server_trusting_context
    from wardgate.errors import AccessDeniedError
    from wardgate.keys import generate_tls_key, public_key_pem

    pin = json.loads(wardctl(cluster.data_dir, "status", "--format", "json").stdout)["ca_pin"]
    pems = await AuthClient.discover_trust(cluster.addr, ca_pin=pin)
    key = public_key_pem(generate_tls_key().public_key())
    async with AuthClient(cluster.addr, server_trusting_context(pems)) as c:
        joined = await c.join(
            token="static-token-for-e2e-tests", role="node", node_name="edge1", tls_public_key=key
        )
        assert joined["host_id"] and "BEGIN CERTIFICATE" in joined["tls_cert"]
        with pytest.raises(AccessDeniedError, match="not valid or has expired"):
            await c.join(token="guessed-token", role="node", node_name="edge2", tls_public_key=key)
        with pytest.raises(AccessDeniedError, match="allows node, not db"):
            await c.join(token="static-token-for-e2e-tests", role="db", node_name="edge3", tls_public_key=key)
    events = json.loads(
        wardctl(cluster.data_dir, "audit", "search", "--type", "join", "--format", "json").stdout
    )
    assert any(e["success"] and e["user"] == "edge1" for e in events)
    refused = [e for e in events if not e["success"]]
    assert {e["host"] for e in refused} >= {"edge2", "edge3"}
    assert all(e["remote_addr"] == "127.0.0.1" for e in refused)
