"""The auth service's logic end to end in one process, on real SQLite storage."""

from __future__ import annotations

from datetime import timedelta

import pytest
from cryptography import x509

from tests.conftest import ADMIN, FakeClock
from wardgate.api.resources import LockTarget, Role, RoleConditions, RoleOptions, RoleSpec
from wardgate.auth import totp
from wardgate.auth.certs import verify_ssh_user_cert, verify_tls_identity
from wardgate.auth.identity import Identity
from wardgate.auth.server import AuthServer
from wardgate.errors import (
    AccessDeniedError,
    AlreadyExistsError,
    AuthenticationError,
    BadParameterError,
    LockedError,
)
from wardgate.keys import generate_ssh_key, generate_tls_key, public_key_pem, ssh_public_key_line

PASSWORD = "correct horse battery"


async def register(auth: AuthServer, clock: FakeClock, name: str = "alice", roles=("access",)) -> str:
    """Invite and register a user; returns the TOTP secret."""
    _, invite = await auth.create_user(ADMIN, name, roles=list(roles), traits={"logins": ["root", "ubuntu"]})
    info = await auth.users.begin_registration(invite.token)
    secret = info["totp_secret"]
    assert info["totp_uri"].startswith("otpauth://totp/")
    await auth.users.complete_registration(invite.token, PASSWORD, totp.current_code(secret, clock()))
    clock.advance(30)  # the enrolment code's step is spent; the next login uses a fresh one
    return secret


def keys() -> dict[str, str]:
    return {
        "ssh_public_key": ssh_public_key_line(generate_ssh_key().public_key()),
        "tls_public_key": public_key_pem(generate_tls_key().public_key()),
    }


async def events(auth: AuthServer, kind: str) -> list[dict]:
    found, _ = await auth.audit.search(types=[kind], limit=100)
    return found


async def test_invite_register_login_issues_working_certs(auth: AuthServer, clock: FakeClock) -> None:
    secret = await register(auth, clock)
    certs = await auth.login("alice", PASSWORD, totp.current_code(secret, clock()), **keys())
    assert set(certs.identity.logins) == {"root", "ubuntu"}
    assert certs.ttl == timedelta(hours=12)
    ident = verify_tls_identity(certs.tls_cert, auth.ca_certs("user"), now=auth.now())
    assert ident.user == "alice" and ident.roles == ("access",)
    assert ident.mfa_verified == "", "login-time MFA must not count as per-session MFA"
    ssh_ident = verify_ssh_user_cert(certs.ssh_cert, auth.ca_ssh_keys("user"), now=auth.now())
    assert set(ssh_ident.logins) == {"root", "ubuntu"}
    logins = await events(auth, "user.login")
    assert logins[0]["success"] is True and logins[0]["user"] == "alice"
    assert (await events(auth, "cert.create"))[0]["identity_user"] == "alice"


async def test_ttl_capped_by_role_max_session_ttl(auth: AuthServer, clock: FakeClock) -> None:
    role = Role.new(
        "short",
        RoleSpec(options=RoleOptions(max_session_ttl=timedelta(hours=1)), allow=RoleConditions(logins=["x"])),
    )
    await auth.put_resource(ADMIN, role)
    secret = await register(auth, clock, roles=("access", "short"))
    certs = await auth.login(
        "alice", PASSWORD, totp.current_code(secret, clock()), ttl=timedelta(hours=8), **keys()
    )
    assert certs.ttl == timedelta(hours=1)


async def test_replayed_otp_code_is_refused(auth: AuthServer, clock: FakeClock) -> None:
    secret = await register(auth, clock)
    code = totp.current_code(secret, clock())
    await auth.login("alice", PASSWORD, code, **keys())
    with pytest.raises(AuthenticationError, match="one-time code"):
        await auth.login("alice", PASSWORD, code, **keys())
    failed = [e for e in await events(auth, "user.login") if not e["success"]]
    assert failed and failed[0]["error"] == "invalid OTP code"


async def test_wrong_password_never_says_which_part_was_wrong(auth: AuthServer, clock: FakeClock) -> None:
    secret = await register(auth, clock)
    with pytest.raises(AuthenticationError, match="invalid username or password"):
        await auth.login("alice", "wrong password!!", totp.current_code(secret, clock()), **keys())
    with pytest.raises(AuthenticationError, match="invalid username or password"):
        await auth.login("nobody", PASSWORD, "123456", **keys())


async def test_lockout_after_five_failures_then_expires(auth: AuthServer, clock: FakeClock) -> None:
    secret = await register(auth, clock)
    for _ in range(5):
        with pytest.raises(AuthenticationError):
            await auth.login("alice", "not the password", "000000", **keys())
    with pytest.raises(LockedError, match="locked until"):
        await auth.login("alice", PASSWORD, totp.current_code(secret, clock()), **keys())
    locked = await events(auth, "user.locked")
    assert locked and locked[0]["user"] == "alice"
    clock.advance(31 * 60)
    certs = await auth.login("alice", PASSWORD, totp.current_code(secret, clock()), **keys())
    assert certs.identity.user == "alice"


async def test_invite_is_single_use_and_policy_checked(auth: AuthServer, clock: FakeClock) -> None:
    _, invite = await auth.create_user(ADMIN, "bob", roles=["access"], traits={})
    info = await auth.users.begin_registration(invite.token)
    with pytest.raises(BadParameterError, match="at least 12"):
        await auth.users.complete_registration(
            invite.token, "short", totp.current_code(info["totp_secret"], clock())
        )
    with pytest.raises(AuthenticationError, match="one-time code"):
        await auth.users.complete_registration(invite.token, PASSWORD, "000000")
    await auth.users.complete_registration(
        invite.token, PASSWORD, totp.current_code(info["totp_secret"], clock())
    )
    with pytest.raises(AuthenticationError, match="invalid or has expired"):
        await auth.users.begin_registration(invite.token)


async def test_reset_issues_new_invite_and_forgets_password(auth: AuthServer, clock: FakeClock) -> None:
    secret = await register(auth, clock)
    await auth.reset_user(ADMIN, "alice")
    with pytest.raises(AuthenticationError):
        await auth.login("alice", PASSWORD, totp.current_code(secret, clock()), **keys())


async def test_join_with_dynamic_and_static_tokens(auth: AuthServer) -> None:
    secret, tok = await auth.create_token(ADMIN, ["node"], timedelta(minutes=30))
    assert secret not in tok.model_dump_json()  # only the hash is stored
    host = await auth.join(secret, system_role="node", node_name="web1", **keys())
    ident = verify_tls_identity(host.tls_cert, auth.ca_certs("host"), now=auth.now())
    assert ident.system_role == "node" and ident.host_id == host.host_id
    cert = x509.load_pem_x509_certificate(host.tls_cert.encode())
    assert "web1" in cert.extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    ).value.get_values_for_type(x509.DNSName)
    static = await auth.join("static-secret-token-123", system_role="app", node_name="app1", **keys())
    assert static.identity.system_role == "app"
    joins = [e for e in await events(auth, "join") if e["success"]]
    assert {e["user"] for e in joins} >= {"web1", "app1"}


async def test_join_refusals_are_clear_and_audited(auth: AuthServer, clock: FakeClock) -> None:
    secret, _ = await auth.create_token(ADMIN, ["node"], timedelta(minutes=1))
    with pytest.raises(AccessDeniedError, match="allows node, not db"):
        await auth.join(secret, system_role="db", node_name="db1", **keys())
    with pytest.raises(AccessDeniedError, match="not valid"):
        await auth.join("wrong-token", system_role="node", node_name="web1", **keys())
    clock.advance(120)
    with pytest.raises(AccessDeniedError, match="expired"):
        await auth.join(secret, system_role="node", node_name="web1", **keys())
    failures = [e for e in await events(auth, "join") if not e["success"]]
    assert len(failures) == 3 and all(e["code"] == "W1202W" for e in failures)


async def test_lock_blocks_new_certificates_and_api_calls(auth: AuthServer, clock: FakeClock) -> None:
    secret = await register(auth, clock, roles=("editor", "access"))
    await auth.create_lock(ADMIN, LockTarget(user="alice"), ttl=timedelta(hours=1), message="incident 42")
    with pytest.raises(AccessDeniedError, match="incident 42"):
        await auth.login("alice", PASSWORD, totp.current_code(secret, clock()), **keys())
    alice = Identity(user="alice", roles=("editor", "access"))
    with pytest.raises(AccessDeniedError, match="incident 42"):
        auth.authorize(alice, "role", "list")
    assert (await events(auth, "lock.create"))[0]["message"] == "incident 42"


async def test_rules_authorize_users_and_services(auth: AuthServer, clock: FakeClock) -> None:
    await register(auth, clock, name="carol", roles=("access",))
    carol = Identity(user="carol", roles=("access",))
    with pytest.raises(AccessDeniedError):
        await auth.list_resources(carol, "role")
    with pytest.raises(AccessDeniedError):
        await auth.create_token(carol, ["node"], timedelta(minutes=5))
    node = Identity(user="h1", system_role="node", host_id="h1")
    with pytest.raises(AccessDeniedError, match="node service may not create token"):
        await auth.create_token(node, ["node"], timedelta(minutes=5))
    roles = await auth.list_resources(ADMIN, "role")
    assert {"access", "editor", "auditor"} <= {r.name for r in roles}


async def test_resources_create_conflict_force_and_secrets_stripped(auth: AuthServer) -> None:
    role = Role.new("dev", RoleSpec(allow=RoleConditions(logins=["dev"], node_labels={"env": "dev"})))
    await auth.put_resource(ADMIN, role)
    with pytest.raises(AlreadyExistsError, match="--force"):
        await auth.put_resource(ADMIN, role)
    await auth.put_resource(ADMIN, role, force=True)
    ca = await auth.get_resource(ADMIN, "cert_authority", "user")
    assert all(not k.ssh_private_key_pem and not k.tls_private_key_pem for k in ca.spec.active_keys)
    with pytest.raises(BadParameterError, match="do not exist"):
        await auth.create_user(ADMIN, "dave", roles=["nope"], traits={})


async def test_visible_nodes_follow_labels_and_logins(auth: AuthServer, clock: FakeClock) -> None:
    from wardgate.api.resources import Node, NodeSpec

    dev = Role.new(
        "dev",
        RoleSpec(
            allow=RoleConditions(logins=["dev", "root"], node_labels={"env": "dev"}),
            deny=RoleConditions(logins=["root"]),
        ),
    )
    await auth.put_resource(ADMIN, dev)
    for name, env in (("web1", "dev"), ("db1", "prod")):
        await auth.put_resource(ADMIN, Node.new(name, NodeSpec(hostname=name), labels={"env": env}))
    await register(auth, clock, name="erin", roles=("dev",))
    seen = auth.visible_nodes(Identity(user="erin", roles=("dev",)))
    assert [(n.name, logins) for n, logins in seen] == [("web1", ["dev"])]
