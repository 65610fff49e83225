"""The auth endpoints a proxy uses to terminate SSH for agentless nodes: host certificates for a
node's names, and short-lived user certificates to log in there on a user's behalf."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
from cryptography.hazmat.primitives.serialization import ssh

from tests.conftest import ADMIN, FakeClock
from wardgate.api.client import AuthClient
from wardgate.api.identityfile import IdentityFile
from wardgate.api.resources import LockTarget, Node, NodeSpec
from wardgate.auth.api import AuthAPI
from wardgate.auth.certs import EXT_IMPERSONATED_BY, verify_ssh_host_cert, verify_ssh_user_cert
from wardgate.auth.identity import Identity
from wardgate.auth.server import AGENTLESS_HOST_CERT_TTL, IMPERSONATION_TTL, AuthServer
from wardgate.errors import AccessDeniedError, LockedError, NotFoundError
from wardgate.keys import (
    generate_ssh_key,
    generate_tls_key,
    private_key_pem,
    public_key_pem,
    ssh_public_key_line,
)

PROXY = Identity(user="proxy-p1", system_role="proxy", host_id="proxy-p1")
NODE = Identity(user="n1", system_role="node", host_id="n1")
ALICE = Identity(user="alice", roles=("access",), logins=("root", "ubuntu"))


def ssh_key() -> str:
    return ssh_public_key_line(generate_ssh_key().public_key())


@pytest.fixture
async def cluster(auth: AuthServer) -> AuthServer:
    """alice (logins root and ubuntu through `access`), an agentless node and an agent node."""
    await auth.create_user(ADMIN, "alice", roles=["access"], traits={"logins": ["root", "ubuntu"]})
    spec = NodeSpec(hostname="legacy.lan", addr="10.0.0.5:22", host_id="legacy", agentless=True)
    await auth.put_resource(ADMIN, Node.new("legacy", spec, labels={"env": "prod"}))
    await auth.put_resource(ADMIN, Node.new("web1", NodeSpec(addr="10.0.0.6:3022", host_id="h-web1")))
    return auth


async def cert_events(auth: AuthServer) -> list[dict]:
    found, _ = await auth.audit.search(types=["cert.create"], limit=100)
    return found


async def test_impersonation_cert_is_one_login_two_minutes_and_names_the_proxy(
    cluster: AuthServer, clock: FakeClock
) -> None:
    line, ident = await cluster.impersonate_ssh(
        PROXY, user="alice", login="root", node="legacy", ssh_public_key=ssh_key()
    )
    cert = ssh.load_ssh_public_identity(line.encode())
    assert isinstance(cert, ssh.SSHCertificate)
    assert cert.valid_principals == [b"root"]
    assert cert.valid_before - int(clock()) <= IMPERSONATION_TTL.total_seconds() <= 120
    assert cert.extensions[EXT_IMPERSONATED_BY.encode()] == b"proxy-p1"
    assert b"permit-agent-forwarding" not in cert.extensions
    decoded = verify_ssh_user_cert(line, cluster.ca_ssh_keys("user"), now=cluster.now())
    assert decoded.user == "alice" and decoded.logins == ("root",) and decoded.roles == ("access",)
    assert ident.logins == ("root",)
    ev = (await cert_events(cluster))[0]
    assert ev["user"] == "alice" and ev["impersonator"] == "proxy-p1" and ev["logins"] == ["root"]
    assert ev["node"] == "legacy" and ev["success"] is True


@pytest.mark.parametrize("caller", [NODE, ALICE, ADMIN], ids=["node", "user", "admin"])
async def test_only_a_proxy_may_call_them(cluster: AuthServer, caller: Identity) -> None:
    with pytest.raises(AccessDeniedError, match="only a proxy"):
        await cluster.impersonate_ssh(
            caller, user="alice", login="root", node="legacy", ssh_public_key=ssh_key()
        )
    with pytest.raises(AccessDeniedError, match="only a proxy"):
        await cluster.sign_agentless_host(caller, node="legacy", ssh_public_key=ssh_key())


async def test_auth_decides_again_from_the_stored_user(cluster: AuthServer) -> None:
    with pytest.raises(AccessDeniedError, match='login "www"'):
        await cluster.impersonate_ssh(
            PROXY, user="alice", login="www", node="legacy", ssh_public_key=ssh_key()
        )
    with pytest.raises(AccessDeniedError, match="no longer exists"):
        await cluster.impersonate_ssh(
            PROXY, user="mallory", login="root", node="legacy", ssh_public_key=ssh_key()
        )
    with pytest.raises(AccessDeniedError, match="Wardgate agent"):
        await cluster.impersonate_ssh(
            PROXY, user="alice", login="root", node="web1", ssh_public_key=ssh_key()
        )
    with pytest.raises(NotFoundError):
        await cluster.impersonate_ssh(
            PROXY, user="alice", login="root", node="nope", ssh_public_key=ssh_key()
        )
    refused = [e for e in await cert_events(cluster) if not e["success"]]
    assert refused and refused[0]["impersonator"] == "proxy-p1" and 'login "www"' in refused[0]["error"]


async def test_locked_user_and_locked_proxy_are_refused(cluster: AuthServer) -> None:
    lock = await cluster.create_lock(
        ADMIN, LockTarget(user="alice"), ttl=timedelta(hours=1), message="incident-9"
    )
    with pytest.raises(LockedError, match="incident-9"):
        await cluster.impersonate_ssh(
            PROXY, user="alice", login="root", node="legacy", ssh_public_key=ssh_key()
        )
    await cluster.delete_resource(ADMIN, "lock", lock.name)
    await cluster.impersonate_ssh(PROXY, user="alice", login="root", node="legacy", ssh_public_key=ssh_key())
    await cluster.create_lock(ADMIN, LockTarget(node="proxy-p1"), ttl=None, message="proxy retired")
    with pytest.raises(LockedError, match="proxy retired"):
        await cluster.sign_agentless_host(PROXY, node="legacy", ssh_public_key=ssh_key())


async def test_agentless_host_cert_covers_the_node_names_only(cluster: AuthServer, clock: FakeClock) -> None:
    line, principals, expires = await cluster.sign_agentless_host(
        PROXY, node="legacy", ssh_public_key=ssh_key()
    )
    host = verify_ssh_host_cert(line, cluster.ca_ssh_keys("host"), now=cluster.now())
    assert (
        set(host.principals)
        == set(principals)
        == {
            "legacy",
            "legacy.test.example",
            "legacy.lan",
            "legacy.lan.test.example",
        }
    )
    assert host.host_id == "legacy" and host.system_role == "proxy"
    assert (expires - cluster.now()) <= AGENTLESS_HOST_CERT_TTL
    with pytest.raises(AccessDeniedError, match="Wardgate agent"):
        await cluster.sign_agentless_host(PROXY, node="web1", ssh_public_key=ssh_key())


@pytest.fixture
async def api(cluster: AuthServer) -> AsyncIterator[str]:
    """The auth API on a real TLS port; yields its address."""
    key = generate_tls_key()
    certs = await cluster.issue_host_certs(
        host_id="auth-1",
        node_name="auth",
        system_role="auth",
        tls_public_key=public_key_pem(key.public_key()),
        addresses=["127.0.0.1"],
    )
    server = AuthAPI(cluster)
    port = await server.start("127.0.0.1", 0, server.server_ssl_context(certs.tls_cert, private_key_pem(key)))
    yield f"127.0.0.1:{port}"
    await server.close()


async def client_as(auth: AuthServer, addr: str, role: str, host_id: str) -> AuthClient:
    key = generate_tls_key()
    certs = await auth.issue_host_certs(
        host_id=host_id, node_name=host_id, system_role=role, tls_public_key=public_key_pem(key.public_key())
    )
    ident = IdentityFile(
        key_pem=private_key_pem(key),
        cert_pem=certs.tls_cert,
        ca_pems=[k.tls_cert_pem for k in auth.ca("host").spec.active_keys],
        cluster=auth.cluster_name,
    )
    return AuthClient.from_identity(ident, addr)


async def test_typed_client_over_https(cluster: AuthServer, api: str) -> None:
    async with await client_as(cluster, api, "proxy", "proxy-p1") as proxy:
        host = await proxy.agentless_host_cert("legacy", ssh_key())
        assert "legacy.test.example" in host["principals"] and host["host_ca_ssh_keys"]
        user = await proxy.impersonate_ssh_cert(
            user="alice", login="ubuntu", node="legacy", ssh_public_key=ssh_key()
        )
        assert user["user"] == "alice" and user["logins"] == ["ubuntu"]
        assert verify_ssh_user_cert(user["ssh_cert"], cluster.ca_ssh_keys("user")).logins == ("ubuntu",)
    async with await client_as(cluster, api, "node", "n1") as node:
        with pytest.raises(AccessDeniedError, match="only a proxy"):
            await node.impersonate_ssh_cert(
                user="alice", login="root", node="legacy", ssh_public_key=ssh_key()
            )
        with pytest.raises(AccessDeniedError, match="only a proxy"):
            await node.agentless_host_cert("legacy", ssh_key())
